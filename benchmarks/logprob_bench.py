"""Peak memory and time of token log-probs + entropy, forward + backward: the chunked
`token_log_probs` against the naive `log_softmax(logits.float())` + gather + entropy.

    python benchmarks/logprob_bench.py                      # T=8192, V=151936, TP 1 and 4, CPU
    python benchmarks/logprob_bench.py --tokens 2048        # smaller, if memory is short
    python benchmarks/logprob_bench.py --device cuda        # on a GPU

Each case runs in a fresh subprocess. The logits are bf16 `[T, V/TP]` (one tensor-parallel
rank's vocab shard), a leaf that requires grad; the objective is sum(w1 * log_prob) +
sum(w2 * entropy), so both outputs are differentiated. TP > 1 is simulated in one process: the
shard is treated as the whole vocabulary (tp_group=None), which has the memory footprint of one
rank; the real TP path adds two all-reduces of `[3, chunk]` floats per chunk (no `[T, V]` memory).

Peak memory is the growth over the resident set that already holds the inputs: on CPU
ru_maxrss (the kernel's high-water mark) minus the RSS just before the timed run; on CUDA
max_memory_allocated minus memory_allocated. It includes the `[T, V/TP]` bf16 gradient, which
both paths must produce. On CPU each worker caps its address space (RLIMIT_AS) so that a case
that does not fit fails cleanly ("> cap") instead of waking the OOM killer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout without installing the package
GIB = 1024**3
NAIVE_FP32_BUFFERS = 5


def _naive(logits, target, temperature):
    x = logits.float() if temperature == 1.0 else logits.float() / temperature
    log_p = torch.log_softmax(x, dim=-1)
    log_prob = log_p.gather(-1, target[:, None]).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return log_prob, entropy


def _chunked(logits, target, temperature, chunk_size):
    from gmpo_megatron.algo.logprobs import token_log_probs

    return token_log_probs(logits, target, temperature=temperature, chunk_size=chunk_size)


def _forward_backward(method, logits, target, w_lp, w_ent, chunk_size, temperature=1.0):
    if method == "naive":
        log_prob, entropy = _naive(logits, target, temperature)
    else:
        log_prob, entropy = _chunked(logits, target, temperature, chunk_size)
    ((log_prob * w_lp).sum() + (entropy * w_ent).sum()).backward()


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def worker(args) -> dict:
    import resource

    torch.manual_seed(0)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokens, shard = args.tokens, args.vocab // args.tp[0]
    logits = torch.empty(tokens, shard, dtype=torch.bfloat16, device=device)
    for start in range(0, tokens, 512):  # fill in slices: no full-size fp32 temporary
        logits[start : start + 512] = 3 * torch.randn(min(512, tokens - start), shard, device=device)
    logits.requires_grad_(True)
    target = torch.randint(0, shard, (tokens,), device=device)
    w_lp, w_ent = torch.randn(tokens, device=device), torch.randn(tokens, device=device)

    # warm up threads and kernels on a slice (same vocab width), then measure the full size
    small = logits.detach()[:64].clone().requires_grad_(True)
    _forward_backward(args.method, small, target[:64], w_lp[:64], w_ent[:64], args.chunk_size)
    del small

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        import psutil

        base = _rss()
        if args.cap_gb:
            vms = psutil.Process().memory_info().vms
            cap = vms + int(args.cap_gb * GIB)
            resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    seconds = []
    for _ in range(args.repeats):
        logits.grad = None
        start = time.perf_counter()
        try:
            _forward_backward(args.method, logits, target, w_lp, w_ent, args.chunk_size)
        except (RuntimeError, MemoryError) as error:
            if "memory" not in str(error).lower() and not isinstance(error, MemoryError):
                raise
            return {"status": "cap", "cap_gb": args.cap_gb}
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    seconds = min(seconds)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"status": "ok", "peak_gb": peak / GIB, "seconds": seconds}


def _run_case(args, method, tp) -> dict:
    command = [
        sys.executable, os.path.abspath(__file__), "--worker", "--method", method, "--tp", str(tp),
        "--tokens", str(args.tokens), "--vocab", str(args.vocab), "--chunk-size", str(args.chunk_size),
        "--device", args.device, "--cap-gb", str(args.cap_gb), "--threads", str(args.threads),
        "--repeats", str(args.repeats),
    ]
    out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO})
    if out.returncode != 0:
        return {"status": f"failed (rc {out.returncode}): {out.stderr.strip().splitlines()[-1:]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt(result, key, digits):
    if result["status"] == "ok":
        return f"{result[key]:.{digits}f}"
    if result["status"] == "est":
        return f"~{result[key]:.1f} (est., > cap, not run)" if key == "peak_gb" else "not run"
    if result["status"] == "cap":  # out of memory: past the CPU address-space cap, or CUDA OOM
        return (f"> cap {result['cap_gb']:.0f}" if result["cap_gb"] else "OOM") if key == "peak_gb" else "-"
    return result["status"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch default)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case; the fastest is reported")
    parser.add_argument(
        "--cap-gb", type=float, default=None,
        help="CPU: address-space growth allowed per worker (default: available memory - 3 GiB - logits)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(worker(args)))
        return

    if args.cap_gb is None and args.device == "cpu":
        import psutil

        logits_gb = args.tokens * args.vocab / min(args.tp) * 2 / GIB
        args.cap_gb = max(1.0, psutil.virtual_memory().available / GIB - 3 - logits_gb)
    args.cap_gb = args.cap_gb or 0.0
    print(
        f"device={args.device} T={args.tokens} V={args.vocab} chunk={args.chunk_size} bf16 logits, "
        f"forward+backward of log_prob and entropy; torch {torch.__version__}, "
        f"{torch.get_num_threads() if not args.threads else args.threads} threads"
        + (f", per-worker cap {args.cap_gb:.1f} GiB" if args.device == "cpu" else "")
    )
    header = (
        "| TP | V/TP | logits GiB | naive peak GiB | ours peak GiB | memory naive/ours "
        "| naive s | ours s | time ours/naive |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for tp in args.tp:
        # The naive path peaks at ~5 fp32 [T, V/TP] buffers (measured at T <= 4096): a case that
        # cannot fit is not attempted, so the benchmark never pushes a shared machine into swap/OOM.
        naive_estimate_gb = NAIVE_FP32_BUFFERS * args.tokens * (args.vocab // tp) * 4 / GIB
        if args.device == "cpu" and naive_estimate_gb > args.cap_gb:
            naive = {"status": "est", "peak_gb": naive_estimate_gb}
        else:
            naive = _run_case(args, "naive", tp)
        ours = _run_case(args, "chunked", tp)
        both = naive["status"] == ours["status"] == "ok"
        memory_ratio = "-"
        if ours["status"] == "ok" and naive["status"] in ("ok", "est"):
            memory_ratio = f"{naive['peak_gb'] / ours['peak_gb']:.2f}" + (" (est.)" if naive["status"] == "est" else "")
        elif ours["status"] == "ok" and naive["status"] == "cap" and args.cap_gb:
            memory_ratio = f"> {args.cap_gb / ours['peak_gb']:.2f}"
        time_ratio = f"{ours['seconds'] / naive['seconds']:.2f}" if both else "-"
        print(
            f"| {tp} | {args.vocab // tp} | {args.tokens * (args.vocab // tp) * 2 / GIB:.2f} | "
            f"{_fmt(naive, 'peak_gb', 2)} | {_fmt(ours, 'peak_gb', 2)} | {memory_ratio} | "
            f"{_fmt(naive, 'seconds', 1)} | {_fmt(ours, 'seconds', 1)} | {time_ratio} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
