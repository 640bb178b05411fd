#!/usr/bin/env python3
"""Summarise a gmpo-train metrics.jsonl: reward in the first and last 10% of steps (issue 2's
learning criterion), and run time.

    python docs/results/summarize.py outputs/tiny_cpu/metrics.jsonl
"""

import json
import sys


def summarize(path: str) -> dict[str, float]:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    if len(rows) < 10:
        raise SystemExit(f"{path}: {len(rows)} steps; need at least 10 to compare first and last 10%")
    k = len(rows) // 10
    first = sum(r["reward_mean"] for r in rows[:k]) / k
    last = sum(r["reward_mean"] for r in rows[-k:]) / k
    return {
        "steps": len(rows), "reward_first_10pct": first, "reward_last_10pct": last,
        "ratio": last / first if first > 0 else float("inf"), "gain": last - first,
        "step_time_total_s": sum(r["time_step_s"] for r in rows),
        # a skipped step (no informative group: no update) has no entropy
        "entropy_first": next(r["entropy"] for r in rows if "entropy" in r),
        "entropy_last": next(r["entropy"] for r in reversed(rows) if "entropy" in r),
        "skipped_steps": sum(int(r.get("skipped", 0)) for r in rows),
    }


if __name__ == "__main__":
    result = summarize(sys.argv[1] if len(sys.argv) > 1 else "outputs/tiny_cpu/metrics.jsonl")
    for key, value in result.items():
        print(f"{key:22s} {value:.4f}" if isinstance(value, float) else f"{key:22s} {value}")
    ok = result["ratio"] >= 2 and result["gain"] >= 0.2
    print("learns (last 10% >= 2x first 10% and +0.2):", "yes" if ok else "NO")
    sys.exit(0 if ok else 1)
