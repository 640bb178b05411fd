"""Converter throughput and memory against a plain file copy, on synthetic Qwen3-MoE checkpoints.

    python benchmarks/convert_bench.py --layers 1 3 --workdir /tmp/convert_bench

For each size: write a random bf16 checkpoint with Qwen3-30B-A3B's tensor shapes and fewer layers
with safetensors directly (no model is built), then time, each in its own child process:

- ``copy``: ``shutil.copyfile`` of every file of the HF checkpoint, and ``copy + fsync`` (the
  physical limit of a *durable* copy: both converters fsync their output before the completion
  marker, and dist_checkpointing fsyncs every file it writes);
- ``hf-to-megatron``: one process, stream writer, torch_dist output;
- ``megatron-to-hf``: stream reader (file-to-file copies where it can), sharded safetensors;
- ``megatron-to-hf --fp8``: the same with block-FP8 quantisation.

Every operation runs ``--rounds`` times, interleaved (the machine may be shared: the table gives the
best and the median), after an ``os.sync()`` so no operation pays for another's dirty pages.
Peak RSS is per operation: each runs under a fresh ``--measure`` wrapper process that reports
``getrusage(RUSAGE_CHILDREN).ru_maxrss`` of its one child (a process's own RUSAGE_CHILDREN is the
maximum over *all* its waited-for children, so a shared parent could not separate them). Time is
measured inside the child after its imports (``time``: torch, transformers and the megatron-core
modules the converters use are imported before the clock starts; they take ~5 s more on 2 cores,
once per process whatever the checkpoint size);
GB/s is checkpoint bytes over ``time``. Each operation's input is read once, untimed, just before
it runs, so reads cost memory bandwidth, not disk time, for all of them alike; durable writes pay
the disk. After the round trip the exported tensors are compared with the originals bit for bit
(outside the timings).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Qwen3-30B-A3B's config (examples/moe/configs/qwen3-30b-a3b/config.json) with fewer layers: every tensor has its real shape
# (128 experts of 768 x 2048, 151936-row embedding and lm_head), so per-tensor costs are real too.
SYNTHETIC = dict(
    hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
    intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
    norm_topk_prob=True, vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6,
    tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    decoder_sparse_step=1, mlp_only_layers=[],
)


def write_synthetic_checkpoint(directory: str, layers: int, shard_bytes: int = 1 << 30) -> int:
    """Random bf16 tensors with the mapping's names and shapes; returns the total bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen3MoeConfig

    from gmpo_megatron.models import get_mapping

    config = Qwen3MoeConfig(num_hidden_layers=layers, dtype="bfloat16", **SYNTHETIC)
    os.makedirs(directory)
    config.save_pretrained(directory)
    shapes = get_mapping(config).expected_hf_shapes()
    generator = torch.Generator().manual_seed(0)
    shards: list[dict] = [{}]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        tensor = torch.empty(shape, dtype=torch.bfloat16)
        if "norm" in name:
            tensor.uniform_(0.9, 1.1, generator=generator)
        else:
            tensor.uniform_(-0.05, 0.05, generator=generator)
        shards[-1][name] = tensor
        size += nbytes
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, os.path.join(directory, filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, filename))
        total += sum(t.numel() * 2 for t in tensors.values())
    shards.clear()
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


# The child programs. Imports happen before the clock starts.
COPY = """
import os, shutil, sys, time
src, dst, durable = sys.argv[1], sys.argv[2], sys.argv[3] == "fsync"
t = time.perf_counter()
os.makedirs(dst)
for name in sorted(os.listdir(src)):
    shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    if durable:
        fd = os.open(os.path.join(dst, name), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
print("ELAPSED", time.perf_counter() - t)
"""

CONVERT = """
import sys, time, warnings
from gmpo_megatron.convert.cli import main
warnings.filterwarnings("ignore")
import transformers, megatron.core.dist_checkpointing
from transformers import Qwen3MoeConfig
import gmpo_megatron.megatron.model_builder, gmpo_megatron.convert.hf_to_megatron
import gmpo_megatron.convert.megatron_to_hf
import importlib, gmpo_megatron.megatron.cpu_compat as cpu_compat
for name in (*cpu_compat._MEGATRON_MODULES, "megatron.core.models.gpt"):
    importlib.import_module(name)  # import only: what cpu_compat.apply() would load on first use
t = time.perf_counter()
code = main(sys.argv[1:])
print("ELAPSED", time.perf_counter() - t)
sys.exit(code)
"""


def measure(argv: list[str]) -> None:
    """``--measure CMD...``: run CMD as this process's only child; print its wall time and
    peak RSS as JSON on the last line."""
    start = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    elapsed = None
    for line in result.stdout.splitlines():
        if line.startswith("ELAPSED"):
            elapsed = float(line.split()[1])
    print(json.dumps({"rc": result.returncode, "wall": wall, "time": elapsed,
                      "peak_rss_gb": peak_kb * 1024 / 1e9,
                      "stderr": result.stderr[-2000:] if result.returncode else ""}))


def run_measured(program: str, args: list[str]) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--measure", sys.executable, "-c",
               program, *args]
    env = {**os.environ, "PYTHONPATH": REPO}
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    if report["rc"] != 0:
        raise RuntimeError(f"{args[:1]} failed:\n{report['stderr']}")
    return report


def warm(directory: str) -> None:
    """Read every file of ``directory`` (untimed), so each operation finds its input in the page
    cache. Without it, which input pages the kernel has evicted to make room for the previous
    operations' outputs (several checkpoint copies exist at once) decides the timings."""
    buffer = bytearray(64 << 20)
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buffer):
                    pass


def bench_size(workdir: str, layers: int, fp8: bool, rounds: int) -> list[dict]:
    """``rounds`` interleaved rounds of every operation; each row keeps every round's numbers."""
    root = os.path.join(workdir, f"L{layers}")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    hf = os.path.join(root, "hf")
    total = write_synthetic_checkpoint(hf, layers)
    gb = total / 1e9
    results: dict[str, list[dict]] = {}

    def measured(operation: str, program: str, args: list[str], cleanup: list[str]) -> None:
        warm(args[args.index("--hf-dir") + 1] if "--hf-dir" in args
             else args[args.index("--megatron-dir") + 1] if "--megatron-dir" in args else args[0])
        os.sync()  # start every operation with no dirty pages left by the previous one
        report = run_measured(program, args)
        results.setdefault(operation, []).append(report)
        print(f"  L{layers} {gb:.2f} GB {operation:22s} time {report['time']:7.2f} s  wall "
              f"{report['wall']:6.2f} s  peak RSS {report['peak_rss_gb']:.2f} GB", flush=True)
        for path in cleanup:
            shutil.rmtree(path, ignore_errors=True)

    copy, megatron, out = (os.path.join(root, n) for n in ("copy", "megatron", "hf_out"))
    for round_index in range(rounds):
        measured("copy", COPY, [hf, copy, "no"], [copy])
        measured("copy + fsync", COPY, [hf, copy, "fsync"], [copy])
        shutil.rmtree(megatron, ignore_errors=True)
        measured("hf-to-megatron", CONVERT, ["hf-to-megatron", "--hf-dir", hf, "--out-dir", megatron],
                 [])
        measured("megatron-to-hf", CONVERT, ["megatron-to-hf", "--megatron-dir", megatron,
                                             "--out-dir", out], [])
        if round_index == 0:
            check = subprocess.run(
                [sys.executable, "-m", "gmpo_megatron.convert.cli", "verify", "--mode", "weights",
                 "--hf-dir", hf, "--other-hf-dir", out],
                capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO})
            print("  round trip:", (check.stdout or check.stderr).strip().splitlines()[-1])
            if check.returncode != 0:
                raise RuntimeError("round trip is not bit-identical")
        shutil.rmtree(out, ignore_errors=True)
        if fp8:
            measured("megatron-to-hf --fp8", CONVERT, ["megatron-to-hf", "--megatron-dir",
                                                       megatron, "--out-dir", out, "--fp8"], [out])
    shutil.rmtree(root)
    rows = []
    for operation, reports in results.items():
        times = sorted(r["time"] for r in reports)
        rows.append({"size_gb": gb, "layers": layers, "operation": operation,
                     "time": times[0], "median": times[len(times) // 2],
                     "wall": min(r["wall"] for r in reports),
                     "peak_rss_gb": max(r["peak_rss_gb"] for r in reports),
                     "gb_per_s": gb / times[0], "rounds": reports})
    return rows


def table(rows: list[dict]) -> str:
    copy = {r["layers"]: r["time"] for r in rows if r["operation"] == "copy"}
    durable = {r["layers"]: r["time"] for r in rows if r["operation"] == "copy + fsync"}
    lines = ["| checkpoint | operation | best (s) | median (s) | GB/s | vs copy | vs copy+fsync "
             "| peak RSS (GB) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['size_gb']:.2f} GB ({r['layers']} layers) | {r['operation']} | "
                     f"{r['time']:.2f} | {r['median']:.2f} | {r['gb_per_s']:.2f} | "
                     f"{r['time'] / copy[r['layers']]:.2f}x | "
                     f"{r['time'] / durable[r['layers']]:.2f}x | {r['peak_rss_gb']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--measure":
        measure(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 3],
                        help="sizes to run: Qwen3-30B-A3B layers (1 ~= 2.5 GB, 3 ~= 4.9 GB; "
                             "48 would be the real 61 GB model)")
    parser.add_argument("--workdir", default="/tmp/convert_bench")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds; the table shows the best and the median")
    parser.add_argument("--no-fp8", action="store_true")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    rows = []
    for layers in args.layers:
        rows.extend(bench_size(args.workdir, layers, fp8=not args.no_fp8, rounds=args.rounds))
    print()
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
