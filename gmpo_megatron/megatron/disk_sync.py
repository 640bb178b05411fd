"""Weight sync through the filesystem: the live Megatron model -> an HF safetensors directory that
an SGLang server loads with ``/update_weights_from_disk`` (``rollout.sglang.weight_sync=disk``).

Layout under ``root`` (``rollout.sglang.sync_dir``, default ``<output_dir>/weight_sync``)::

    v000007/                       version 7: complete, what the servers load
        model-pp00-00001-of-00001.safetensors    pipeline stage 0's tensors
        model-pp01-00001-of-00001.safetensors    stage 1's ...
        model.safetensors.index.json             every tensor -> its file
        config.json, tokenizer files             so a (re)started server can boot from it
    .v000008.tmp/                  a version being written (renamed when complete)

One writer per pipeline stage: the stage's first rank (TP, DP and CP rank 0) writes the stage's
tensors, gathered to it over its TP / expert groups in buckets (``weight_gather``: one gather per
bucket, the other DP replicas take no part), with the converters' streaming safetensors writer
(memory: about two buckets); no rank ever holds the whole model. Rank 0
writes the index after every stage has finished, then renames the directory: a reader never sees
a half-written version. The last ``keep`` versions are kept (a restarted server boots from the
newest).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from gmpo_megatron.convert.hf_io import INDEX_FILE
from gmpo_megatron.convert.safetensors_writer import DEFAULT_MAX_SHARD_BYTES, ShardedSafetensorsWriter, TensorSpec
from gmpo_megatron.megatron.weight_gather import DEFAULT_BUCKET_BYTES, gather_stage, is_stage_sender
from gmpo_megatron.megatron.weights import _stage_metadata
from gmpo_megatron.models.base import QwenMapping


def version_dir(root: str | Path, version: int) -> Path:
    return Path(root) / f"v{version:06d}"


def stage_specs(model_chunks, mapping: QwenMapping) -> list[TensorSpec]:
    """HF tensor specs of this pipeline stage, in the order the stage's tensors stream."""
    expected = mapping.expected_hf_shapes()
    specs = []
    for name, _, dtype in _stage_metadata(model_chunks):
        if mapping.tied and name == "output_layer.weight":
            continue
        specs += [TensorSpec(hf, expected[hf], dtype) for hf in mapping.group_of(name).hf_names]
    return specs


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def write_weights_dir(model_chunks, mapping: QwenMapping, root: str | Path, version: int, *,
                      static_files: str | Path | None = None, keep: int = 2,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Path:
    """Collective (every rank): write version ``version`` under ``root``; returns its directory.
    ``static_files`` (a directory with config.json and tokenizer files) is copied in by rank 0.
    ``bucket_bytes`` bounds each gather of the stage's shards (``weight_gather``)."""
    from megatron.core import parallel_state as ps

    root = Path(root)
    final, tmp = version_dir(root, version), root / f".v{version:06d}.tmp"
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".v*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    stage = ps.get_pipeline_model_parallel_rank()
    weight_map: dict[str, str] = {}
    stream = gather_stage(model_chunks, None, bucket_bytes)  # full tensors on the writer only
    if is_stage_sender():
        staging = tmp / f".stage{stage:02d}"
        staging.mkdir()
        specs = stage_specs(model_chunks, mapping)
        writer = ShardedSafetensorsWriter(str(staging), specs, max_shard_bytes)
        try:
            for name, tensor in stream:
                if mapping.tied and name == "output_layer.weight":
                    continue
                for hf_name, hf_tensor in mapping.to_hf(name, tensor):
                    writer.write(hf_name, hf_tensor.detach().to("cpu").contiguous())
            files = writer.finish()
        finally:
            writer.close()
        renamed = {}
        for i, file in enumerate(files):
            target = f"model-pp{stage:02d}-{i + 1:05d}-of-{len(files):05d}.safetensors"
            os.replace(staging / file, tmp / target)
            renamed[file] = target
        for shard in writer.shards:
            for spec in shard.specs:
                weight_map[spec.name] = renamed[shard.filename]
        (staging / INDEX_FILE).unlink(missing_ok=True)
        staging.rmdir()
    else:
        for _ in stream:  # the gathers are collective: take part, write nothing
            pass
    maps: list = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(maps, weight_map)
    else:
        maps = [weight_map]
    if rank == 0:
        merged: dict[str, str] = {}
        for part in maps:
            merged.update(part)
        missing = sorted(set(mapping.expected_hf_shapes()) - set(merged))
        if missing:
            raise RuntimeError(f"weight sync v{version}: no stage wrote {missing[:4]} ({len(missing)} tensors)")
        total = sum(os.path.getsize(tmp / f) for f in set(merged.values()))
        (tmp / INDEX_FILE).write_text(json.dumps(
            {"metadata": {"total_size": total, "weight_version": version},
             "weight_map": dict(sorted(merged.items()))}, indent=1) + "\n")
        if static_files is not None:
            for item in Path(static_files).iterdir():
                if item.is_file() and not item.name.endswith(".safetensors") and item.name != INDEX_FILE:
                    shutil.copy2(item, tmp / item.name)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        versions = sorted(p for p in root.glob("v[0-9]*") if p.is_dir())
        for old in versions[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def read_weights_dir(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a sync directory (tests and checks)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out
