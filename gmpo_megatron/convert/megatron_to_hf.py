"""Megatron ``torch_dist`` checkpoint -> HF safetensors (optionally block FP8), independent of the
layout the checkpoint was saved at.

Two readers feed the same writer:

- ``stream`` (default, one process): reads full tensors straight from the checkpoint files with
  :class:`TorchDistCheckpoint` in batches of at most ``read_budget`` bytes, in the mapping's order;
  no model is built. Peak memory is a small multiple of ``max(read_budget, largest tensor)`` —
  independent of the model size — and each output shard is closed as soon as its last tensor is
  written (``ShardedSafetensorsWriter``).
- ``model`` (one process or torchrun at any TP/PP/EP/ETP): builds the model at that layout, loads
  the checkpoint with dist_checkpointing and gathers full tensors with ``iter_hf_weights``'s
  machinery; global rank 0 writes. Holds the model; useful to check a layout end to end.

Before anything is written: the HF config (stored in the checkpoint, or ``--hf-config-dir``, or
both — then they must agree) is validated, and the checkpoint's tensor names and shapes are checked
against the mapping (missing / unexpected / mis-shaped tensors are named). Vocab padding rows are
dropped; ``lm_head.weight`` is written only for untied models. Output dtypes: ``dtype`` if given,
else each tensor's original HF dtype recorded at import, else the config's ``dtype``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

from gmpo_megatron.convert import fp8 as fp8_format
from gmpo_megatron.convert.errors import ConversionError
from gmpo_megatron.convert.hf_to_megatron import _ensure_process_group, dtype_name, parse_dtype
from gmpo_megatron.convert.megatron_ckpt import (
    HF_KIND,
    checkpoint_info,
    converter_build_options,
    load_megatron_model,
    stored_dtype,
)
from gmpo_megatron.convert.safetensors_writer import (
    DEFAULT_MAX_SHARD_BYTES,
    ShardedSafetensorsWriter,
    TensorSpec,
)
from gmpo_megatron.convert.staging import StagedDir, copy_model_files
from gmpo_megatron.convert.torch_dist_reader import TorchDistCheckpoint
from gmpo_megatron.convert.validate import check_megatron_config, check_megatron_tensors
from gmpo_megatron.models import get_mapping
from gmpo_megatron.models.base import QwenMapping

DEFAULT_READ_BUDGET = 1 << 30


def output_dtypes(info, mapping: QwenMapping, dtype: str | None,
                  fallback: torch.dtype) -> dict[str, torch.dtype]:
    """Per-HF-tensor output dtype (see the module docstring for the precedence)."""
    names = mapping.hf_names()
    if dtype is not None:
        chosen = parse_dtype(dtype)
        return dict.fromkeys(names, chosen)
    record = (info.marker or {}).get("hf_dtypes")
    if record:
        default = parse_dtype(record["default"])
        overrides = {n: parse_dtype(d) for n, d in record.get("overrides", {}).items()}
        return {n: overrides.get(n, default) for n in names}
    config_dtype = getattr(info.hf_config, "dtype", None) or getattr(info.hf_config, "torch_dtype",
                                                                      None)
    if isinstance(config_dtype, str):
        config_dtype = parse_dtype(config_dtype)
    return dict.fromkeys(names, config_dtype or fallback)


def stream_megatron_tensors(reader: TorchDistCheckpoint, mapping: QwenMapping,
                            read_budget: int = DEFAULT_READ_BUDGET
                            ) -> Iterator[tuple[str, torch.Tensor]]:
    """(canonical name, full tensor) in the mapping's order, read in batches of <= read_budget."""
    batch: list[str] = []
    size = 0
    for group in mapping.groups():
        name = group.megatron_name
        nbytes = reader.tensors[name].nbytes
        if batch and size + nbytes > read_budget:
            yield from _read_batch(reader, batch)
            batch, size = [], 0
        batch.append(name)
        size += nbytes
    if batch:
        yield from _read_batch(reader, batch)


def byte_copy_plan(reader: TorchDistCheckpoint, mapping: QwenMapping, name: str,
                   dtypes: dict[str, torch.dtype]) -> list[tuple[str, str, int, int]] | None:
    """``[(hf_name, file, offset, nbytes)]`` when every HF tensor of group ``name`` is a contiguous
    byte range of stored raw chunk data in its output dtype (e.g. an expert's gate: one stored
    chunk; the embedding: the first vocab rows of one chunk), so it can be copied file-to-file.

    The mapping is applied to a *meta* tensor: pieces that are views of it (identity, row splits)
    have known byte offsets; pieces the mapping had to copy (the QKV split) do not, and the group
    is then read and transformed normally. None when any piece is not a plain byte range."""
    stored = reader.tensors[name]
    group = mapping.group_of(name)
    if any(dtypes[hf_name] != stored.dtype for hf_name in group.hf_names):
        return None
    ranges = reader.byte_ranges(name)
    if ranges is None:
        return None
    canonical = torch.empty(stored.shape, dtype=stored.dtype, device="meta")
    itemsize = stored.dtype.itemsize
    plan = []
    for hf_name, piece in mapping.to_hf(name, canonical):
        if not (piece is canonical or piece._base is canonical) or not piece.is_contiguous():
            return None
        start = piece.storage_offset() * itemsize
        end = start + piece.numel() * itemsize
        position = 0
        for path, offset, nbytes in ranges:
            if position <= start and end <= position + nbytes:
                plan.append((hf_name, path, offset + start - position, end - start))
                break
            position += nbytes
        else:
            return None
    return plan


def _export_stream(reader: TorchDistCheckpoint, mapping: QwenMapping, writer, dtypes, fp8: bool,
                   read_budget: int, byte_copy: bool) -> int:
    """The stream reader's export loop, in the mapping's order; returns the number of HF tensors
    copied file-to-file. Groups that are plain byte ranges are copied by the kernel; the others
    are read in batches of <= read_budget bytes, transformed and written."""
    batch: list[str] = []
    size, copied = 0, 0
    hf_shapes = mapping.expected_hf_shapes()

    def flush() -> None:
        nonlocal batch, size
        for name, full in _read_batch(reader, batch):
            for hf_name, tensor in mapping.to_hf(name, full):
                _write(writer, hf_name, tensor, dtypes[hf_name], fp8)
        batch, size = [], 0

    for group in mapping.groups():
        name = group.megatron_name
        plan = byte_copy_plan(reader, mapping, name, dtypes) if byte_copy and not fp8 else None
        if plan is None:
            nbytes = reader.tensors[name].nbytes
            if batch and size + nbytes > read_budget:
                flush()
            batch.append(name)
            size += nbytes
            continue
        flush()
        for hf_name, path, offset, nbytes in plan:
            writer.copy_from(hf_name, hf_shapes[hf_name], dtypes[hf_name], path, offset, nbytes)
            copied += 1
    flush()
    return copied


def _read_batch(reader, names):
    tensors = reader.read(names)
    for name in names:
        yield name, tensors.pop(name)  # drop our reference as soon as the consumer has it


def _model_tensors(info, mapping: QwenMapping, params_dtype: torch.dtype, tp: int, pp: int,
                   ep: int, etp: int | None) -> Iterator[tuple[str, torch.Tensor]]:
    """(canonical name, full tensor) gathered from a model built at the current layout (parallel
    state initialised by the caller), reordered into the mapping's order (buffering at most the
    tensors that arrive early: about one layer)."""
    from gmpo_megatron.megatron.model_builder import build_model
    from gmpo_megatron.megatron.weights import iter_full_megatron_weights

    model = build_model(info.hf_config, converter_build_options(tp=tp, pp=pp, ep=ep, etp=etp,
                                                     params_dtype=params_dtype))
    check_megatron_config(info.hf_config, model)
    load_megatron_model(model, info.directory)
    order = [g.megatron_name for g in mapping.groups()]
    pending: dict[str, torch.Tensor] = {}
    position = 0
    for name, tensor in iter_full_megatron_weights(model):
        if mapping.tied and name == "output_layer.weight":
            continue
        pending[name] = tensor
        while position < len(order) and order[position] in pending:
            yield order[position], pending.pop(order[position])
            position += 1
    if position != len(order):
        raise ConversionError(f"the model did not produce {order[position]}")


def convert_megatron_to_hf(megatron_dir: str, out_dir: str, *, hf_config_dir: str | None = None,
                           fp8: bool = False, dtype: str | None = None,
                           max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, reader: str = "stream",
                           tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None,
                           read_budget: int = DEFAULT_READ_BUDGET, byte_copy: bool = True,
                           overwrite: bool = False, log=print) -> str:
    """Convert; returns the output directory (collective under torchrun with ``reader="model"``)."""
    info = checkpoint_info(megatron_dir, hf_config_dir)
    hf_config = info.hf_config
    mapping = get_mapping(hf_config)
    dist_reader = TorchDistCheckpoint(info.directory, vocab_size=hf_config.vocab_size)
    check_megatron_tensors(dist_reader.shapes(), mapping, info.directory)
    source_dtype = stored_dtype(dist_reader)
    dtypes = output_dtypes(info, mapping, dtype, source_dtype)
    hf_shapes = mapping.expected_hf_shapes()
    specs = [TensorSpec(n, hf_shapes[n], dtypes[n]) for n in mapping.hf_names()]
    if fp8:
        specs = fp8_format.fp8_specs(specs)
    staged = StagedDir(out_dir, overwrite=overwrite)

    if reader not in ("stream", "model"):
        raise ConversionError(f"reader {reader!r} is not one of 'stream', 'model'")
    if reader == "stream" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConversionError("the stream reader runs in one process; use --reader model under "
                              "torchrun")

    writer, rank0, started = None, True, False
    try:
        if reader == "model":
            from gmpo_megatron.megatron.parallel import init_distributed

            started = _ensure_process_group()
            init_distributed(tp=tp, pp=pp, ep=ep, etp=etp)
            rank0 = dist.get_rank() == 0
            source = _model_tensors(info, mapping, source_dtype, tp, pp, ep, etp)
        if rank0:
            staged.prepare()
            writer = ShardedSafetensorsWriter(staged.path, specs, max_shard_bytes)
            log(f"megatron-to-hf: {hf_config.model_type}, {len(specs)} tensors "
                f"({sum(s.nbytes for s in specs) / 1e9:.2f} GB){' block FP8' if fp8 else ''}, "
                f"{reader} reader")
        copied = 0
        if reader == "stream":
            copied = _export_stream(dist_reader, mapping, writer, dtypes, fp8, read_budget,
                                    byte_copy)
        else:
            for name, full in source:
                if rank0:
                    for hf_name, tensor in mapping.to_hf(name, full):
                        _write(writer, hf_name, tensor, dtypes[hf_name], fp8)
                del full
        if rank0:
            files = writer.finish()
            _write_config(info, staged.path, specs, fp8)
            model_files = copy_model_files(info.hf_files_dir, staged.path, skip=("config.json",))
            staged.commit({
                "kind": HF_KIND, "source": info.directory, "model_type": hf_config.model_type,
                "fp8": fp8, "reader": reader, "files": files, "copied": model_files,
                "tensors_copied_file_to_file": copied,
                "dtypes": sorted({dtype_name(s.dtype) for s in specs}),
                "ignored_checkpoint_keys": len(dist_reader.ignored_keys),
            })
            for warning in (fp8_format.expert_block_warnings(hf_config) if fp8 else []):
                log(f"megatron-to-hf: note: {warning}")
            log(f"megatron-to-hf: wrote {staged.final} ({len(files)} shard(s))")
        if reader == "model":
            dist.barrier()
    except BaseException:
        if writer is not None:
            writer.close()
        if rank0:
            staged.abort()
        raise
    finally:
        if started:
            from gmpo_megatron.megatron.parallel import destroy_distributed

            destroy_distributed()
    return staged.final


def _write(writer: ShardedSafetensorsWriter, hf_name: str, tensor: torch.Tensor,
           dtype: torch.dtype, fp8: bool) -> None:
    if fp8 and fp8_format.is_quantised(hf_name):
        q, scale_inv = fp8_format.quantize_block_fp8(tensor)
        writer.write(hf_name, q)
        writer.write(hf_name + fp8_format.SCALE_SUFFIX, scale_inv)
    elif fp8:
        writer.write(hf_name, tensor.to(fp8_format.KEPT_DTYPE))
    else:
        writer.write(hf_name, tensor.to(dtype))


def _tokenizer_ids(directory: str) -> dict[str, int]:
    """The bos / eos / pad ids of the tokenizer saved in ``directory`` (none: {})."""
    names = ("tokenizer.json", "tokenizer_config.json")
    if not any(os.path.isfile(os.path.join(directory, name)) for name in names):
        return {}
    from transformers import AutoTokenizer

    from gmpo_megatron.data.tokenizer import special_token_ids

    return special_token_ids(AutoTokenizer.from_pretrained(directory, local_files_only=True))


def _write_config(info, directory: str, specs: list[TensorSpec], fp8: bool) -> None:
    """The source config.json, with its dtype set to the output's, the bos / eos / pad ids of
    the tokenizer copied with it where the config has none (else generate() on the export never
    stops early) and, for FP8, the quantization_config; every other field is kept byte-for-byte
    in meaning."""
    with open(os.path.join(info.hf_files_dir, "config.json")) as f:
        config = json.load(f)
    float_dtypes = [s.dtype for s in specs if s.dtype in (torch.bfloat16, torch.float16,
                                                          torch.float32)]
    main = fp8_format.KEPT_DTYPE if fp8 else max(set(float_dtypes), key=float_dtypes.count)
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype", "torch_dtype"]
    for key in keys:
        config[key] = dtype_name(main)
    from gmpo_megatron.data.tokenizer import SPECIAL_TOKEN_ID_KEYS

    if any(config.get(key) is None for key in SPECIAL_TOKEN_ID_KEYS):
        ids = _tokenizer_ids(info.hf_files_dir)
        config.update({key: value for key, value in ids.items() if config.get(key) is None})
    if fp8:
        config["quantization_config"] = fp8_format.quantization_config(
            [s.name for s in specs if not s.name.endswith(fp8_format.SCALE_SUFFIX)])
    else:
        config.pop("quantization_config", None)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
