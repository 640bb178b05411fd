"""Resumable checkpoints: model + optimizer through ``dist_checkpointing``, trainer state as JSON.

Layout under ``<output_dir>/checkpoints``::

    step_000020/            a finished checkpoint (torch_dist files, trainer_state.json, COMPLETE)
    step_000030.tmp/        a save in progress (ignored; removed by the next save)
    latest                  the name of the newest finished checkpoint

A save writes into ``step_N.tmp``, writes ``MANIFEST.json`` (size + SHA-256 of every file,
``checkpoint_manifest``), marks it ``COMPLETE`` and only then renames it, so a crash at any point
leaves the previous checkpoint intact; then it prunes all but the last ``keep_last``. The writer
processes of a save die with the trainer (``save_processes``).

A load checks the manifest first and reads every pickle through ``safe_load``. A damaged
checkpoint (a file missing, truncated or changed; an unreadable ``trainer_state.json``) raises
``DamagedCheckpointError`` naming the file; ``load_newest_intact`` then falls back to the previous
finished one and moves the damaged one aside (``step_N.damaged``).
Model weights reload at any parallel layout (dist_checkpointing reshards); the optimizer uses the
DistributedOptimizer's ``fully_reshardable`` format (the other formats lose or share Adam's
``step`` on reload with torch Adam; see ``upstream_fixes.fix_torch_adam_step_restore``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from gmpo_megatron.megatron import checkpoint_manifest as manifest

COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
_STEP_DIR = re.compile(r"step_\d+")


class DamagedCheckpointError(ValueError):
    """A finished checkpoint whose files are not what was saved; the message names them."""


def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _all_gather(value) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _from_rank0(value):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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
    return sorted(p for p in root.glob("step_*") if _STEP_DIR.fullmatch(p.name) and p.is_dir()
                  and (p / COMPLETE).exists())


def _point_latest(root: Path) -> None:
    """``root/latest`` names the newest finished checkpoint (written atomically; removed if none)."""
    newest = latest_checkpoint(root)
    if newest is None:
        (root / "latest").unlink(missing_ok=True)
        return
    (root / "latest.tmp").write_text(newest.name + "\n")
    os.replace(root / "latest.tmp", root / "latest")


def unfinished_checkpoints(root: str | Path) -> list[Path]:
    """Step directories that never got their ``COMPLETE`` marker (a save that did not finish)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and not (p / COMPLETE).exists()
                  and (_STEP_DIR.fullmatch(p.name) or p.name.endswith(".tmp")))


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

    from gmpo_megatron.megatron.save_processes import writers_die_with_parent

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
    with writers_die_with_parent():
        dist_checkpointing.save(_sharded_state(model, optimizer, is_loading=False), str(tmp))
    _barrier()
    if _is_rank0():
        state = dict(trainer_state, step=step)
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1, sort_keys=True))
    _barrier()
    files = _manifest_entries(tmp)
    if _is_rank0():
        manifest.write_manifest(tmp, files)
        (tmp / COMPLETE).write_text(f"{step}\n")
        if final.exists():  # re-saving the same step (e.g. a resumed run): replace atomically
            shutil.rmtree(final)
        os.replace(tmp, final)
        _point_latest(root)
        for old in finished_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _manifest_entries(directory: Path) -> dict[str, dict]:
    """Every file's digest; each rank hashes its share of the files (collective)."""
    rank, world = _world()
    names = _from_rank0(manifest.listed_files(directory) if rank == 0 else None)
    files: dict[str, dict] = {}
    for part in _all_gather(manifest.digests(directory, manifest.shard(names, rank, world))):
        files.update(part)
    return files


def verify_checkpoint(path: Path) -> bool:
    """Check ``path`` against its manifest (collective; each rank checks its share). Returns False
    when the checkpoint has no manifest (saved before manifests); raises DamagedCheckpointError
    naming every missing, truncated or changed file."""
    rank, world = _world()
    try:
        expected = manifest.read_manifest(path)
    except ValueError as error:
        raise DamagedCheckpointError(f"checkpoint {path} is damaged: {error}") from None
    if expected is None:
        return False
    found = manifest.problems(path, expected, manifest.shard(sorted(expected), rank, world))
    found = [problem for part in _all_gather(found) for problem in part]
    if found:
        raise DamagedCheckpointError(f"checkpoint {path} is damaged: " + "; ".join(found))
    return True


def read_trainer_state(path: Path) -> dict[str, Any]:
    state_path = Path(path) / TRAINER_STATE
    try:
        state = json.loads(state_path.read_text())
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError("not a trainer state (no 'step')")
    except (OSError, ValueError) as error:
        raise DamagedCheckpointError(f"checkpoint {path} is damaged: {state_path} is unreadable "
                                     f"({type(error).__name__}: {error})") from None
    return state


def init_optimizer_state(optimizer) -> None:
    """Create Adam's state (exp_avg, exp_avg_sq, step) on every sub-optimizer. It must exist before
    the optimizer's loading state dict is built: with torch Adam, a missing state gives
    ``KeyError: 'step'`` / a failed step-count assertion on load (patches/README.md)."""
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
    """Load model (+ optimizer, when given) from a finished checkpoint; returns the trainer state.

    Every pickle in it goes through the restricted loaders of ``safe_load``. Raises
    DamagedCheckpointError when its files do not match its manifest, or (without a manifest)
    when they cannot be read."""
    from torch.distributed.checkpoint.api import CheckpointException

    from gmpo_megatron.megatron.safe_load import UnsafeCheckpointError, dist_checkpointing_load
    from gmpo_megatron.megatron.weights import unwrap

    path = Path(path)
    if not (path / COMPLETE).exists():
        raise FileNotFoundError(
            f"{path} is not a finished checkpoint (no {COMPLETE} marker): it may be an interrupted "
            "save; resume from the 'latest' one instead"
        )
    verified = verify_checkpoint(path)
    trainer_state = read_trainer_state(path)
    request = _sharded_state(model, optimizer, is_loading=True)
    failure = None
    try:
        state = dist_checkpointing_load(request, str(path))
    except UnsafeCheckpointError:
        raise
    except (Exception, CheckpointException) as error:  # noqa: BLE001 - classified below
        failure = error
    failed = [f for f in _all_gather(None if failure is None else _describe(failure)) if f]
    if failed and not verified:
        # no manifest to say what changed: a failed read of an unverified checkpoint is damage
        raise DamagedCheckpointError(f"checkpoint {path} is damaged (it has no {manifest.MANIFEST} "
                                     f"to check): reading it failed with {failed[0]}") from None
    if failure is not None:
        raise failure
    if failed:
        raise RuntimeError(f"loading checkpoint {path} failed on another rank: {failed[0]}")
    unwrap(model).load_state_dict(state["model"], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
        _unshare_adam_steps(optimizer)
    return trainer_state


def _describe(error: BaseException) -> str:
    """One line for an error, the first rank's own error when DCP wrapped it."""
    failures = getattr(error, "failures", None)
    if failures:
        error = next(iter(failures.values()))[0]
    return f"{type(error).__name__}: {error}"


def newest_saved_config(root: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The config stored with the newest finished checkpoint whose trainer state reads."""
    for path in reversed(finished_checkpoints(root)):
        try:
            return path, read_trainer_state(path).get("config", {})
        except DamagedCheckpointError:
            continue
    return None


def load_newest_intact(root: str | Path, model, optimizer,
                       warn: Callable[[str], None]) -> tuple[Path, dict[str, Any], list[str]]:
    """Load the newest finished checkpoint that is intact (collective). Newer unfinished saves
    and damaged checkpoints are reported through ``warn`` and passed over; a damaged one is moved
    aside to ``step_N.damaged``. Returns (path, trainer state, what was passed over)."""
    root = Path(root)
    passed_over = []
    finished = finished_checkpoints(root)
    for path in unfinished_checkpoints(root):
        if not finished or path.name.split(".")[0] > finished[-1].name:
            note = f"{path} has no {COMPLETE} marker (a save that did not finish): skipped"
            warn(note)
            passed_over.append(note)
    for path in reversed(finished):
        init_optimizer_state(optimizer)
        try:
            state = load_checkpoint(path, model, optimizer)
        except DamagedCheckpointError as error:
            warn(f"{error}; falling back to the previous finished checkpoint")
            passed_over.append(str(error))
            _barrier()
            if _is_rank0():
                aside = path.with_name(path.name + ".damaged")
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(path, aside)
                _point_latest(root)
            _barrier()
            continue
        return path, state, passed_over
    raise DamagedCheckpointError(
        f"no intact checkpoint under {root}: " + " | ".join(passed_over) + ". Restore the files "
        f"from a backup, or move {root} away and --resume to start again from step 0, or start a "
        "new run in another output_dir"
    )


def load_model_weights(path: str | Path, model) -> None:
    """Model weights only (any layout): for evaluation or for starting a new run from a checkpoint."""
    load_checkpoint(path, model, optimizer=None)


def rng_state() -> dict[str, Any]:
    """Torch's CPU RNG as a list of ints (JSON-safe; nothing is unpickled on resume)."""
    return {"torch_cpu": torch.get_rng_state().tolist()}


def set_rng_state(state: dict[str, Any]) -> None:
    if "torch_cpu" in state:
        torch.set_rng_state(torch.tensor(state["torch_cpu"], dtype=torch.uint8))
