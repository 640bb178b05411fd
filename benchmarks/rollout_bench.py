"""Rollout engines side by side, in one run: SGLang vs the embedded engine, and disk weight sync.

1. Generation throughput (response tokens / s) of the same prompts x n requests on the same
   weights: ``EmbeddedEngine`` (transformers in this process) and ``SGLangEngine`` (one real
   SGLang server on this machine), best of ``--rounds`` warm rounds each, interleaved.
2. Disk weight sync: ``write_weights_dir`` (the trainer's writer: Megatron shards -> HF
   safetensors) and the server's ``/update_weights_from_disk`` of that directory, against a plain
   copy (``shutil.copyfile``) of the same files, best of ``--rounds``.

Ratios are what to read on a shared CPU; absolute times only mean something on a quiet machine.

    python benchmarks/rollout_bench.py --sglang-python .venv-sglang/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _prompts(count: int, seed: int) -> list[list[int]]:
    """Task-like prompts: 3..8 random ids from the 64-token vocabulary (no special ids 0-3)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 9, (count,), generator=generator).tolist()
    return [torch.randint(4, 64, (n,), generator=generator).tolist() for n in lengths]


def _best(times: list[float]) -> float:
    return min(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sglang-python", default=str(REPO / ".venv-sglang" / "bin" / "python"))
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, nargs="+", default=[4, 64],
                        help="one measurement per value (4: the tiny demo; 64: decode-bound)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests-per-call", type=int, default=16,
                        help="requests batched into one /generate call (rollout.sglang.requests_per_call)")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args(argv)

    from gmpo_megatron.components import stop_token_ids, sync_static_files
    from gmpo_megatron.data.tokenizer import build_task_tokenizer
    from gmpo_megatron.megatron.disk_sync import write_weights_dir
    from gmpo_megatron.megatron.model_builder import BuildOptions, build_model
    from gmpo_megatron.megatron.parallel import init_distributed
    from gmpo_megatron.megatron.weights import iter_hf_weights, load_hf_weights
    from gmpo_megatron.models import get_mapping
    from gmpo_megatron.models.presets import load_hf_config
    from gmpo_megatron.rollout.embedded import EmbeddedEngine, checkpoint_state_dict
    from gmpo_megatron.rollout.engine import DiskWeights, SamplingParams
    from gmpo_megatron.rollout.sglang import SGLangEngine
    from gmpo_megatron.rollout.sglang_launch import ServerSpec, free_port

    import transformers

    init_distributed(seed=0)
    config = load_hf_config("tiny-qwen3-moe")
    mapping = get_mapping(config)
    tokenizer = build_task_tokenizer()
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = build_model(config, BuildOptions())
    load_hf_weights(model, mapping, checkpoint_state_dict(hf).__getitem__)

    work = Path(tempfile.mkdtemp(prefix="rollout_bench_"))
    stops = stop_token_ids(tokenizer, config)
    static = sync_static_files(work / "sync", config, tokenizer, stops, 0)
    embedded = EmbeddedEngine(config, pad_token_id=tokenizer.pad_token_id, max_batch_size=256)
    embedded.update_weights(iter_hf_weights(model, mapping), version=1)
    spec = ServerSpec(python=args.sglang_python, host="127.0.0.1", port=free_port(), dtype="float32",
                      context_length=256, max_total_tokens=32768, mem_fraction_static=0.3, cpu=True,
                      log_path=work / "server.log")
    sglang = SGLangEngine(launch=[spec], max_in_flight=256, requests_per_call=args.requests_per_call)
    results: dict = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "commit": _commit(),
                     "cpus": os.cpu_count(), "prompts": args.prompts, "n": args.n,
                     "requests_per_call": args.requests_per_call, "generation": [],
                     "weight_sync": {}}
    try:
        version = 1
        path = write_weights_dir(model, mapping, work / "sync", version, static_files=static)
        start = time.perf_counter()
        sglang.update_weights(DiskWeights(path, version), version=version)
        results["server_start_s"] = time.perf_counter() - start

        prompts = _prompts(args.prompts, seed=1)
        for max_new in args.max_new_tokens:
            sampling = SamplingParams(n=args.n, temperature=1.0, max_new_tokens=max_new, stop_token_ids=stops)
            timings = {"embedded": [], "sglang": []}
            tokens = {"embedded": 0, "sglang": 0}
            for round_ in range(args.rounds + 1):  # round 0 warms both up
                for name, engine in (("embedded", embedded), ("sglang", sglang)):
                    start = time.perf_counter()
                    rollouts = engine.generate(prompts, sampling, seed=round_)
                    elapsed = time.perf_counter() - start
                    if round_:
                        timings[name].append(elapsed)
                        tokens[name] += sum(len(r.response_ids) for r in rollouts)
            row = {"max_new_tokens": max_new}
            for name in timings:
                per_round = tokens[name] / args.rounds
                row[f"{name}_tokens_per_s"] = per_round / _best(timings[name])
                row[f"{name}_best_s"] = _best(timings[name])
            row["sglang_over_embedded"] = row["sglang_tokens_per_s"] / row["embedded_tokens_per_s"]
            results["generation"].append(row)

        write, load, copy = [], [], []
        for _ in range(args.rounds):
            version += 1
            start = time.perf_counter()
            path = write_weights_dir(model, mapping, work / "sync", version, static_files=static)
            write.append(time.perf_counter() - start)
            start = time.perf_counter()
            sglang.update_weights(DiskWeights(path, version), version=version)
            load.append(time.perf_counter() - start)
            target = work / f"copy{version}"
            target.mkdir()
            start = time.perf_counter()
            for item in path.iterdir():
                shutil.copyfile(item, target / item.name)
            copy.append(time.perf_counter() - start)
            shutil.rmtree(target)
        size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
        results["weight_sync"] = {
            "bytes": size, "write_best_s": _best(write), "server_load_best_s": _best(load),
            "copy_best_s": _best(copy), "write_over_copy": _best(write) / _best(copy),
            "write_and_load_over_copy": (_best(write) + _best(load)) / _best(copy)}
    finally:
        sglang.close()
        embedded.close()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return results


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
