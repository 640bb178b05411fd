"""What ``--resume`` may change, and the record of what it changed.

A checkpoint's ``trainer_state.json`` holds the config it was trained with (``"config"``). A resume
compares it, key by key, with the config given now:

- ``MAY_CHANGE`` keys are honoured. The run length and bookkeeping (``train.steps``,
  ``save_interval``, ``keep_last``, ``logging.*``, ``output_dir``); the learning-rate schedule
  (``train.lr``, ``min_lr``, ``lr_schedule``, ``warmup_steps``), which is rebuilt from the current
  config at the resumed optimizer-step count; how a batch is cut into micro-batches (same
  gradients); the parallel layout (the checkpoint reshards on load); and where rollouts are served
  (``rollout.engine``, ``rollout.sglang.*``, ``rollout.max_batch_size``: the same policy samples;
  ``rollout.weight_gather_mb``: the same weights, gathered in other buckets).
- Every other key is refused, by name, with the saved value: the seed, data and rollout settings
  fix the data stream, ``algorithm.*`` / ``reward.fn`` / ``train.ppo_epochs`` ... the objective,
  ``model.*`` / ``precision.*`` / ``moe.*`` / ``parallel.distributed_optimizer`` what the checkpoint
  holds. A key unknown to this list is refused too, so a new option is safe by default.

Nothing is taken from the saved config: in particular ``reward.fn`` (user code) is only ever what
the command line and config file say now. Each resume appends one line to
``output_dir/resumes.jsonl``: the checkpoint resumed, the checkpoints passed over and why, and
every changed key as ``[saved, now]``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

MAY_CHANGE = (
    "output_dir", "logging.",
    "train.steps", "train.save_interval", "train.keep_last",
    "train.lr", "train.min_lr", "train.lr_schedule", "train.warmup_steps",
    "train.packing", "train.max_tokens_per_microbatch", "train.micro_batch_size",
    "parallel.tp", "parallel.pp", "parallel.ep", "parallel.etp", "parallel.sequence_parallel",
    "parallel.pp_first_stage_layers", "parallel.pp_last_stage_layers", "parallel.moe_dispatcher",
    "rollout.engine", "rollout.sglang.", "rollout.max_batch_size", "rollout.weight_gather_mb",
)
RECORD = "resumes.jsonl"


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def may_change(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in MAY_CHANGE)


def config_changes(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, list]:
    """``{dotted key: [saved, now]}`` for every key whose value differs (keys both configs have)."""
    old, new = _flatten(saved), _flatten(now)
    return {key: [old[key], new[key]] for key in sorted(old.keys() & new.keys())
            if old[key] != new[key]}


def _as_override(key: str, value: Any) -> str:
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def check_resume_config(saved: dict[str, Any], now: dict[str, Any], checkpoint: Path) -> dict[str, list]:
    """The changes a resume makes; raises ValueError naming every key it may not change."""
    changes = config_changes(saved, now)
    refused = {key: pair for key, pair in changes.items() if not may_change(key)}
    if refused:
        listed = "; ".join(f"{key} (checkpoint {old!r}, now {new!r})" for key, (old, new) in refused.items())
        restore = " ".join(_as_override(key, old) for key, (old, _) in refused.items())
        raise ValueError(
            f"--resume from {checkpoint} cannot change {listed}: these fix the data stream, the "
            f"objective or what the checkpoint holds. Pass the checkpoint's values ({restore}), "
            "or start a new run in another output_dir. A resume may change: "
            + ", ".join(k + ("*" if k.endswith(".") else "") for k in MAY_CHANGE)
        )
    return changes


def record_resume(output_dir: Path, checkpoint: Path | None, step: int, changes: dict[str, list],
                  passed_over: list[str]) -> None:
    """One line of ``resumes.jsonl`` (checkpoint None: a restart from step 0)."""
    entry = {"time": time.strftime("%Y-%m-%d %H:%M:%S"),
             "checkpoint": checkpoint.name if checkpoint else None, "step": step,
             "changes": changes, "passed_over": passed_over}
    with open(output_dir / RECORD, "a") as f:
        f.write(json.dumps(entry) + "\n")
