"""Resumable checkpoints: model + optimizer through ``dist_checkpointing``, trainer state as JSON.

Layout under ``<output_dir>/checkpoints``::

    step_000020/            a finished checkpoint (torch_dist files, trainer_state.json, COMPLETE)
    step_000030.tmp/        a save in progress (ignored; removed by the next save)
    latest                  the name of the newest finished checkpoint

A save writes into ``step_N.tmp``, marks it ``COMPLETE`` and only then renames it, so a crash at any
point leaves the previous checkpoint intact; then it prunes all but the last ``keep_last``.
Model weights reload at any parallel layout (dist_checkpointing reshards); the optimizer uses the
DistributedOptimizer's ``fully_reshardable`` format (the other formats lose or share Adam's
``step`` on reload with torch Adam, REFERENCE.md §2).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def finished_checkpoints(root: str | Path) -> list[Path]:
    """Finished checkpoints under ``root``, oldest first (step names sort by step)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and (p / COMPLETE).exists()
                  and not p.name.endswith(".tmp"))


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest finished checkpoint under ``root`` (None when there is none)."""
    finished = finished_checkpoints(root)
    return finished[-1] if finished else None


def _sharded_state(model, optimizer, is_loading: bool) -> dict[str, Any]:
    from gmpo_megatron.megatron.weights import unwrap

    model_sd = unwrap(model).sharded_state_dict()
    state = {"model": model_sd}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                          metadata=_OPTIM_METADATA)
    return state


def save_checkpoint(root: str | Path, step: int, model, optimizer, trainer_state: dict[str, Any],
                    keep_last: int = 2) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = root / checkpoint_name(step)
    tmp = root / (checkpoint_name(step) + ".tmp")
    if _is_rank0():
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    if optimizer is not None:
        init_optimizer_state(optimizer)  # a save before the first step: Adam state = zeros, step 0
    dist_checkpointing.save(_sharded_state(model, optimizer, is_loading=False), str(tmp))
    _barrier()
    if _is_rank0():
        state = dict(trainer_state, step=step)
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1, sort_keys=True))
        (tmp / COMPLETE).write_text(f"{step}\n")
        if final.exists():  # re-saving the same step (e.g. a resumed run): replace atomically
            shutil.rmtree(final)
        os.replace(tmp, final)
        (root / "latest.tmp").write_text(final.name + "\n")
        os.replace(root / "latest.tmp", root / "latest")
        for old in finished_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def init_optimizer_state(optimizer) -> None:
    """Create Adam's state (exp_avg, exp_avg_sq, step) on every sub-optimizer. It must exist before
    the optimizer's loading state dict is built: with torch Adam, a missing state gives
    ``KeyError: 'step'`` / a failed step-count assertion on load (REFERENCE.md §2, item 10)."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        sub.init_state_fn(sub.optimizer, sub.config)
        for state in sub.optimizer.state.values():  # torch Adam's init_state_fn creates no step
            state.setdefault("step", torch.zeros((), dtype=torch.float32))


def _unshare_adam_steps(optimizer) -> None:
    """megatron-core 0.16.1's DistributedOptimizer.load_state_dict (torch Adam path) gives every
    parameter the *same* ``step`` tensor; Adam increments it in place once per parameter, so the
    bias correction would run ahead after a resume. Give each parameter its own copy."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in sub.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].detach().clone()


def load_checkpoint(path: str | Path, model, optimizer) -> dict[str, Any]:
    """Load model (+ optimizer, when given) from a finished checkpoint; returns the trainer state."""
    from megatron.core import dist_checkpointing

    from gmpo_megatron.megatron.weights import unwrap

    path = Path(path)
    if not (path / COMPLETE).exists():
        raise FileNotFoundError(
            f"{path} is not a finished checkpoint (no {COMPLETE} marker): it may be an interrupted "
            "save; resume from the 'latest' one instead"
        )
    state = dist_checkpointing.load(_sharded_state(model, optimizer, is_loading=True), str(path))
    unwrap(model).load_state_dict(state["model"], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
        _unshare_adam_steps(optimizer)
    return json.loads((path / TRAINER_STATE).read_text())


def load_model_weights(path: str | Path, model) -> None:
    """Model weights only (any layout): for evaluation or for starting a new run from a checkpoint."""
    load_checkpoint(path, model, optimizer=None)


def rng_state() -> dict[str, Any]:
    """Torch's CPU RNG as a list of ints (JSON-safe; nothing is unpickled on resume)."""
    return {"torch_cpu": torch.get_rng_state().tolist()}


def set_rng_state(state: dict[str, Any]) -> None:
    if "torch_cpu" in state:
        torch.set_rng_state(torch.tensor(state["torch_cpu"], dtype=torch.uint8))
