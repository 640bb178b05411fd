"""What a run writes for people to read, from global rank 0: ``config.yaml``, ``hf/`` (config +
tokenizer, for exporting checkpoints), ``metrics.jsonl`` (one JSON object per step), TensorBoard
scalars and a progress bar with step, reward, loss and step time."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class RunLog:
    def __init__(self, output_dir: Path, cfg, hf_config, tokenizer, *, start_step: int,
                 enabled: bool) -> None:
        self.enabled = enabled
        self.metrics_path = output_dir / "metrics.jsonl"
        self.writer = self.progress = None
        if not enabled:
            return
        (output_dir / "config.yaml").write_text(cfg.to_yaml())
        # `gmpo-convert megatron-to-hf --hf-config-dir <output_dir>/hf` exports any checkpoint
        hf_config.save_pretrained(str(output_dir / "hf"))
        tokenizer.save_pretrained(str(output_dir / "hf"))
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "tensorboard"))
        if cfg.logging.progress_bar:
            from tqdm import tqdm

            self.progress = tqdm(total=cfg.train.steps, initial=start_step, desc="gmpo", dynamic_ncols=True)

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, row["step"])
        if self.progress is not None:
            self.progress.set_postfix(reward=f"{row['reward_mean']:.3f}",
                                      loss=f"{row.get('loss', float('nan')):.4f}",
                                      step_s=f"{row['time_step_s']:.2f}")
            self.progress.update(1)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.writer is not None:
            self.writer.close()
