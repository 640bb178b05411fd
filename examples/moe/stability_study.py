#!/usr/bin/env python3
"""The MoE clip-stability study on the tiny MoE (docs/stability.md), from one command:

    python examples/moe/stability_study.py --out outputs/stability_study          # the full study
    python examples/moe/stability_study.py --steps 2 --seeds 1 --out /tmp/smoke   # a smoke run

Runs GRPO (clip 0.2) and GMPO at token clip 0.4, 0.2, 0.1, GMPO with a sequence-level clip (0.4)
and GMPO without clip, each at seeds 1..--seeds, off-policy (examples/moe/stability_study.yaml:
8 mini-batch updates per rollout round). Every run is a plain ``gmpo-train`` in
``OUT/<variant>/seed<k>/`` (its log beside it in ``seed<k>.log``); then it writes
``OUT/summary.md`` and ``OUT/summary.json`` (the table below, per run and per variant) and overlay
dashboards through gmpo-plot: ``OUT/dashboards/<variant>.png`` (the seeds of a variant) and
``OUT/dashboards/all_variants_seed1.png``. A run already finished in OUT is reused, one
interrupted after a checkpoint is resumed, so a stopped study continues where it was.

Summary per variant: final reward (mean of the last 10% of steps) mean +- sd over seeds; the
token log-ratio's p0.1 (lowest over the steps) and p99.9 (highest), averaged over seeds; the
fraction of tokens with |log-ratio| > 0.4 (mean over steps and seeds); the largest grad norm of
any optimizer step; collapsed runs (COLLAPSE_RULE).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BASE_CONFIG = HERE / "stability_study.yaml"

VARIANTS: dict[str, list[str]] = {
    "grpo_clip0.2": ["algorithm.loss=grpo", "algorithm.clip_eps_low=0.2", "algorithm.clip_eps_high=0.2"],
    "gmpo_clip0.4": ["algorithm.loss=gmpo", "algorithm.clip_eps_low=0.4", "algorithm.clip_eps_high=0.4"],
    "gmpo_clip0.2": ["algorithm.loss=gmpo", "algorithm.clip_eps_low=0.2", "algorithm.clip_eps_high=0.2"],
    "gmpo_clip0.1": ["algorithm.loss=gmpo", "algorithm.clip_eps_low=0.1", "algorithm.clip_eps_high=0.1"],
    "gmpo_seqclip0.4": ["algorithm.loss=gmpo", "algorithm.clip_level=sequence", "algorithm.clip_eps_low=0.4",
                        "algorithm.clip_eps_high=0.4"],
    "gmpo_noclip": ["algorithm.loss=gmpo", "algorithm.clip_level=none"],
}

COLLAPSE_RULE = ("a run collapsed if gmpo-train stopped with an error (non-finite loss, grad norm or "
                 "reward), or if its best 10-step mean reward reached at least 0.2 and its final reward "
                 "(last 10% of steps) fell below half of that best")


# -- one run -----------------------------------------------------------------------------------
def read_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a torn last line of a killed run
    return rows


def run_one(run_dir: Path, seed: int, overrides: list[str], steps: int, extra: list[str],
            threads: int) -> dict:
    """gmpo-train for one (variant, seed), unless run_dir already holds its finished result (all
    ``steps`` steps, or a stop with an error, which a rerun would repeat); a run interrupted after
    a checkpoint (train.save_interval) is resumed."""
    result_path = run_dir / "study_result.json"
    if result_path.is_file():
        result = json.loads(result_path.read_text())
        if result["returncode"] != 0 or len(read_rows(run_dir)) >= steps:
            return dict(result, reused=True)
    resume = (run_dir / "checkpoints" / "latest").is_file()
    cmd = [sys.executable, "-m", "gmpo_megatron.cli", "--config", str(BASE_CONFIG), *(["--resume"] if resume else []),
           f"output_dir={run_dir}", f"seed={seed}", f"train.steps={steps}", *overrides, *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(run_dir.parent / f"{run_dir.name}.log", "a") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    result = {"returncode": proc.returncode, "wall_s": time.perf_counter() - start}
    if run_dir.is_dir():
        result_path.write_text(json.dumps(result) + "\n")
    return dict(result, reused=False)


# -- the summary -------------------------------------------------------------------------------
def _values(rows: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def run_summary(rows: list[dict], returncode: int) -> dict:
    """The per-run numbers of the table (nan where the run has no such metric)."""
    rewards = _values(rows, "reward_mean")
    k = max(1, len(rewards) // 10)
    final = sum(rewards[-k:]) / k if rewards else math.nan
    windows = [sum(rewards[i:i + 10]) / len(rewards[i:i + 10]) for i in range(max(1, len(rewards) - 9))]
    best = max(windows) if rewards else math.nan
    p_low, p_high = _values(rows, "log_ratio_p0.1"), _values(rows, "log_ratio_p99.9")
    tails = _values(rows, "log_ratio_abs_gt_0.4")
    grad = _values(rows, "grad_norm_max") or _values(rows, "grad_norm")
    collapsed = returncode != 0 or (best >= 0.2 and final < 0.5 * best)
    return {
        "steps": len(rows), "returncode": returncode, "final_reward": final, "best_reward_10": best,
        "log_ratio_p0.1_min": min(p_low) if p_low else math.nan,
        "log_ratio_p99.9_max": max(p_high) if p_high else math.nan,
        "frac_abs_log_ratio_gt_0.4": sum(tails) / len(tails) if tails else math.nan,
        "grad_norm_max": max(grad) if grad else math.nan,
        "skipped_steps": sum(int(r.get("skipped", 0)) for r in rows),
        "collapsed": bool(collapsed),
    }


def variant_summary(runs: list[dict]) -> dict:
    finals = [r["final_reward"] for r in runs if math.isfinite(r["final_reward"])]

    def mean(key):
        values = [r[key] for r in runs if math.isfinite(r[key])]
        return sum(values) / len(values) if values else math.nan

    grads = [r["grad_norm_max"] for r in runs if math.isfinite(r["grad_norm_max"])]
    return {
        "seeds": len(runs),
        "final_reward_mean": sum(finals) / len(finals) if finals else math.nan,
        "final_reward_sd": statistics.stdev(finals) if len(finals) > 1 else math.nan,
        "log_ratio_p0.1_min": mean("log_ratio_p0.1_min"), "log_ratio_p99.9_max": mean("log_ratio_p99.9_max"),
        "frac_abs_log_ratio_gt_0.4": mean("frac_abs_log_ratio_gt_0.4"),
        "grad_norm_max": max(grads) if grads else math.nan,
        "collapsed": sum(r["collapsed"] for r in runs),
    }


def _fmt(x: float, spec: str = ".3f") -> str:
    return format(x, spec) if math.isfinite(x) else "-"


def summary_table(variants: dict[str, dict]) -> str:
    lines = ["| variant | seeds | final reward (mean ± sd) | log-ratio p0.1 (min over steps) | "
             "log-ratio p99.9 (max over steps) | tokens with abs log-ratio > 0.4 | max grad norm | collapsed |",
             "|---|---|---|---|---|---|---|---|"]
    for name, v in variants.items():
        sd = f" ± {_fmt(v['final_reward_sd'])}" if math.isfinite(v["final_reward_sd"]) else ""
        lines.append(f"| {name} | {v['seeds']} | {_fmt(v['final_reward_mean'])}{sd} | {_fmt(v['log_ratio_p0.1_min'])} | "
                     f"{_fmt(v['log_ratio_p99.9_max'])} | {_fmt(v['frac_abs_log_ratio_gt_0.4'], '.4f')} | "
                     f"{_fmt(v['grad_norm_max'], '.2f')} | {v['collapsed']}/{v['seeds']} |")
    return "\n".join(lines)


def write_dashboards(out: Path, run_dirs: dict[str, list[Path]]) -> list[Path]:
    """One overlay of the seeds per variant, and one of every variant's first seed (gmpo-plot)."""
    from gmpo_megatron.plot import plot_runs

    written = []
    for name, dirs in run_dirs.items():
        dirs = [d for d in dirs if (d / "metrics.jsonl").is_file()]
        if dirs:
            path = out / "dashboards" / f"{name}.png"
            plot_runs(dirs, path, labels=[f"{name} {d.name}" for d in dirs], smooth=5)
            written.append(path)
    firsts = {name: dirs[0] for name, dirs in run_dirs.items() if (dirs[0] / "metrics.jsonl").is_file()}
    if firsts:
        path = out / "dashboards" / f"all_variants_{next(iter(firsts.values())).name}.png"
        plot_runs(list(firsts.values()), path, labels=list(firsts), smooth=5)
        written.append(path)
    return written


# -- the command -------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/stability_study", help="directory of every run and the summary")
    parser.add_argument("--steps", type=int, default=200, help="training steps per run (default 200)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 1..N per variant (default 3)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME",
                        help=f"variants to run (default all: {', '.join(VARIANTS)})")
    parser.add_argument("--jobs", type=int, default=1, help="runs at the same time (default 1)")
    parser.add_argument("--set", nargs="+", default=[], metavar="key=value", dest="extra",
                        help="gmpo-train overrides for every run, e.g. --set train.lr=1e-3")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.seeds < 1 or args.jobs < 1:
        parser.error("--steps, --seeds and --jobs must be >= 1")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    plan = [(name, seed, out / name / f"seed{seed}") for name in args.variants for seed in range(1, args.seeds + 1)]
    start = time.perf_counter()
    print(f"stability study: {len(plan)} runs ({len(args.variants)} variants x {args.seeds} seeds, "
          f"{args.steps} steps each) into {out}", flush=True)

    from concurrent.futures import ThreadPoolExecutor

    def launch(item):
        name, seed, run_dir = item
        result = run_one(run_dir, seed, VARIANTS[name], args.steps, args.extra, threads)
        status = "reused" if result["reused"] else f"rc={result['returncode']}, {result['wall_s']:.0f} s"
        print(f"  {name} seed {seed}: {status}", flush=True)
        return result

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(launch, plan))

    per_run, per_variant, run_dirs = {}, {}, {}
    for (name, seed, run_dir), result in zip(plan, results):
        summary = run_summary(read_rows(run_dir), result["returncode"])
        per_run[f"{name}/seed{seed}"] = dict(summary, wall_s=result["wall_s"], reused=result["reused"])
        run_dirs.setdefault(name, []).append(run_dir)
    for name in args.variants:
        per_variant[name] = variant_summary([per_run[f"{name}/seed{s}"] for s in range(1, args.seeds + 1)])
    dashboards = write_dashboards(out, run_dirs)
    wall = time.perf_counter() - start
    table = summary_table(per_variant)
    (out / "summary.json").write_text(json.dumps(
        {"variants": per_variant, "runs": per_run, "collapse_rule": COLLAPSE_RULE, "steps": args.steps,
         "seeds": args.seeds, "extra_overrides": args.extra, "wall_s": wall}, indent=1) + "\n")
    (out / "summary.md").write_text(
        f"# Stability study: {args.steps} steps, seeds 1..{args.seeds}\n\n{table}\n\n"
        f"Collapse rule: {COLLAPSE_RULE}.\n\nWall time: {wall:.0f} s. Dashboards: "
        + ", ".join(str(p.relative_to(out)) for p in dashboards) + "\n")
    print(table)
    print(f"wall time {wall:.0f} s; summary in {out / 'summary.md'}; dashboards in {out / 'dashboards'}")
    failed = [key for key, r in per_run.items() if r["returncode"] != 0]
    if failed:
        print(f"{len(failed)} run(s) stopped with an error (counted as collapsed): {', '.join(failed)}; "
              "their logs are beside their run directories")
    return 0


if __name__ == "__main__":
    sys.exit(main())
