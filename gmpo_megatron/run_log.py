"""What a run writes for people to read, from global rank 0: ``config.yaml``, ``hf/`` (config +
tokenizer, for exporting checkpoints), ``metrics.jsonl`` (one JSON object per step), TensorBoard
scalars, optional Weights & Biases logging, ``dashboard.png`` (gmpo-plot, at each checkpoint and
at the end), a progress bar with step, reward, loss and step time, and an end-of-run summary."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any


class RunLog:
    def __init__(self, output_dir: Path, cfg, hf_config, tokenizer, *, start_step: int,
                 enabled: bool) -> None:
        self.enabled = enabled
        self.output_dir, self.cfg = output_dir, cfg
        self.metrics_path = output_dir / "metrics.jsonl"
        self.writer = self.progress = self.wandb = None
        self.steps_logged, self.steps_plotted, self.skipped = 0, 0, []
        if not enabled:
            return
        # A resumed run continues at start_step: the rows (and TensorBoard events) a crashed run
        # wrote after its checkpoint are dropped, so the run has one row per step.
        continues = truncate_metrics(self.metrics_path, start_step)
        if cfg.logging.wandb:
            self.wandb = _start_wandb(cfg, output_dir)
        (output_dir / "config.yaml").write_text(cfg.to_yaml())
        # `gmpo-convert megatron-to-hf --hf-config-dir <output_dir>/hf` exports any checkpoint;
        # the config gets the tokenizer's eos/pad/bos ids where it has none, so generate() on an
        # export stops at eos
        import copy

        from gmpo_megatron.data.tokenizer import special_token_ids

        saved_config = copy.deepcopy(hf_config)
        for key, value in special_token_ids(tokenizer).items():
            if getattr(saved_config, key, None) is None:
                setattr(saved_config, key, value)
        saved_config.save_pretrained(str(output_dir / "hf"))
        tokenizer.save_pretrained(str(output_dir / "hf"))
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "tensorboard"),
                                        purge_step=start_step if continues else None)
        self.line_every = 0  # progress as plain lines every N steps (stderr is not a terminal)
        if cfg.logging.progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.progress = tqdm(total=cfg.train.steps, initial=start_step, desc="gmpo", dynamic_ncols=True)
        elif cfg.logging.progress_bar:
            # a redirected log would get every carriage-return frame of a bar: ~20 lines instead
            self.line_every = max(1, round(cfg.train.steps / 20))

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.steps_logged += 1
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, row["step"])
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row["step"])
        if row.get("skipped"):
            if not self.skipped:
                self._write(skip_message(row, self.cfg))
            self.skipped.append(row["step"])
        if self.progress is not None:
            self.progress.set_postfix(reward=f"{row['reward_mean']:.3f}",
                                      loss=f"{row.get('loss', float('nan')):.4f}",
                                      step_s=f"{row['time_step_s']:.2f}")
            self.progress.update(1)
        elif self.line_every:
            done = row["step"] + 1
            if done % self.line_every == 0 or done == self.cfg.train.steps or self.steps_logged == 1:
                self._write(f"gmpo step {done}/{self.cfg.train.steps}  reward {row['reward_mean']:.3f}  "
                            f"loss {row.get('loss', float('nan')):.4f}  step_s {row['time_step_s']:.2f}")

    def _write(self, text: str) -> None:
        if self.progress is not None:
            self.progress.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def dashboard(self) -> Path | None:
        """Render ``dashboard.png`` from metrics.jsonl (gmpo-plot). A failure to draw is reported
        and never stops the run: the metrics are already on disk."""
        if not (self.enabled and self.cfg.logging.dashboard and self.metrics_path.is_file()):
            return None
        from gmpo_megatron.plot import plot_runs

        path = self.output_dir / "dashboard.png"
        try:
            plot_runs([self.output_dir], path, labels=[self.output_dir.name])
        except Exception as error:  # noqa: BLE001 - the dashboard is a convenience
            self._write(f"gmpo-train: could not draw {path}: {type(error).__name__}: {error}")
            return None
        self.steps_plotted = self.steps_logged
        return path

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.writer is not None:
            self.writer.close()
        if not self.enabled:
            return
        if self.steps_logged > self.steps_plotted:
            self.dashboard()
        if self.wandb is not None:
            self.wandb.finish()
        import psutil

        wall_s = time.time() - psutil.Process().create_time()  # imports and set-up included
        print(run_summary(self.output_dir, self.cfg, wall_s, self.skipped), flush=True)


def skip_message(row: dict[str, Any], cfg) -> str:
    """What a skipped step means, for the first one a run meets."""
    rounds = int(row.get("dynamic_sampling_rounds", 1))
    if row.get("informative_groups", 1) == 0:
        groups = int(row.get("num_groups", 0))
        why = (f"no informative group: in all {groups} groups ({rounds} sampling round"
               f"{'s' if rounds != 1 else ''}) every sample of a prompt got the same reward, so every "
               "advantage is 0 and there is nothing to learn from")
    else:
        why = "no sample has a non-zero advantage, or there are fewer samples than data-parallel ranks"
    if cfg.algorithm.dynamic_sampling:
        fix = (f"raise algorithm.dynamic_sampling_max_rounds (now {cfg.algorithm.dynamic_sampling_max_rounds}) "
               "to sample more prompts in such a step")
    else:
        fix = "algorithm.dynamic_sampling=true samples more prompts in such a step"
    return (f"gmpo-train: step {row['step']} skipped ({why}); the weights are unchanged. {fix}. "
            "Further skipped steps are counted in the end-of-run summary.")


def run_summary(output_dir: Path, cfg, wall_s: float, skipped: list[int]) -> str:
    """The end-of-run summary: steps, reward over the first and last 10% of steps, wall time,
    skipped steps and where the files are (the whole metrics.jsonl, resumed runs included)."""
    path = output_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    lines = [f"gmpo-train: {len(rows)} of {cfg.train.steps} steps in {output_dir} "
             f"(this process: {wall_s:.1f} s wall, {len(skipped)} skipped"
             + (f": {_ranges(skipped)}" if skipped else "") + ")"]
    if rows:
        k = max(1, len(rows) // 10)
        first = sum(r["reward_mean"] for r in rows[:k]) / k
        last = sum(r["reward_mean"] for r in rows[-k:]) / k
        step_s = sum(r.get("time_step_s", 0.0) for r in rows)
        lines.append(f"  reward_mean: first 10% {first:.3f}, last 10% {last:.3f} ({k} step"
                     f"{'s' if k > 1 else ''} each); the steps took {step_s:.1f} s")
    files = [name for name in ("metrics.jsonl", "dashboard.png", "config.yaml", "tensorboard", "wandb")
             if (output_dir / name).exists()]
    latest = output_dir / "checkpoints" / "latest"
    if latest.is_file():
        files.append(f"checkpoints/{latest.read_text().strip()}")
    lines.append(f"  files: {', '.join(files)}")
    return "\n".join(lines)


def _ranges(steps: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    parts, start = [], None
    for i, step in enumerate(steps):
        if start is None:
            start = step
        if i + 1 == len(steps) or steps[i + 1] != step + 1:
            parts.append(f"{start}-{step}" if step != start else f"{step}")
            start = None
    return ", ".join(parts)


def _start_wandb(cfg, output_dir: Path):
    """A Weights & Biases run in ``output_dir/wandb``; offline (no network) unless WANDB_MODE says
    otherwise (``WANDB_MODE=online`` to upload; ``wandb sync`` uploads an offline run later)."""
    try:
        import wandb
    except ImportError:
        raise ImportError("logging.wandb=true needs the wandb package, which is not installed: "
                          "pip install -e '.[wandb]' (or set logging.wandb=false)") from None
    return wandb.init(project=cfg.logging.wandb_project, name=cfg.logging.wandb_run_name or output_dir.name,
                      dir=str(output_dir), config=cfg.model_dump(mode="json"),
                      mode=os.environ.get("WANDB_MODE", "offline"))


def truncate_metrics(path: Path, start_step: int) -> bool:
    """Keep the rows of ``metrics.jsonl`` before ``start_step`` (atomically). Returns whether a
    previous run had written the file."""
    if not path.exists():
        return False
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and _row_step(line) is not None and _row_step(line) < start_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return True


def _row_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a row torn by the crash
