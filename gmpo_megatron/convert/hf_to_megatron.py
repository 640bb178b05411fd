"""HF safetensors -> Megatron ``torch_dist`` checkpoint that loads at any parallel layout.

Steps (every rank runs the same checks, so a refusal happens on all ranks before any collective):

1. Read and check the HF config (``validate.check_hf_config``) and the checkpoint's tensor list and
   shapes against the mapping (``validate.check_hf_tensors``) — headers only, no data.
2. Build this rank's Megatron model at the requested layout and check it against the HF config
   (``validate.check_megatron_config``).
3. Fill this rank's shards with ``load_hf_weights``: each rank reads only the HF tensors it needs
   (its pipeline stage, its experts), one at a time.
4. Save ``model.sharded_state_dict()`` with dist_checkpointing into a staging directory, copy the HF
   config / tokenizer files into ``hf/``, write the marker, rename (``staging.StagedDir``).

Memory: one copy of this rank's share of the model plus one HF tensor group. Under ``torchrun`` with
PP / EP / TP each rank holds only its shard; ranks that differ only in data-parallel index hold
replicas and dist_checkpointing writes each replicated tensor once.

Precision: parameters are kept in the checkpoint's widest float dtype (``dtype="auto"``), so the
round trip is bit-exact; every HF tensor's original dtype is recorded in the marker and restored by
``megatron-to-hf``.
"""

from __future__ import annotations

import os
from collections import Counter

import torch
import torch.distributed as dist

from gmpo_megatron.convert.errors import ConversionError
from gmpo_megatron.convert.hf_io import open_hf_checkpoint
from gmpo_megatron.convert.megatron_ckpt import (
    HF_SUBDIR,
    MEGATRON_KIND,
    converter_build_options,
    load_hf_config,
    save_megatron_model,
)
from gmpo_megatron.convert.staging import StagedDir, copy_model_files
from gmpo_megatron.convert.validate import check_hf_config, check_hf_tensors, check_megatron_config
from gmpo_megatron.models import get_mapping

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
_WIDTH = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConversionError(f"dtype {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def choose_params_dtype(hf_dtypes: dict[str, torch.dtype], requested: str) -> torch.dtype:
    """``auto``: the widest dtype present (fp16 + bf16 mixed would need fp32), so no value is
    rounded; an explicit dtype is honoured as asked."""
    if requested != "auto":
        return parse_dtype(requested)
    present = set(hf_dtypes.values())
    if present <= {torch.bfloat16} or present <= {torch.float16}:
        return next(iter(present))
    return torch.float32 if max(_WIDTH.get(d, 3) for d in present) <= 2 else torch.float64


def _dtype_record(hf_dtypes: dict[str, torch.dtype]) -> dict:
    default = Counter(hf_dtypes.values()).most_common(1)[0][0]
    return {"default": dtype_name(default),
            "overrides": {n: dtype_name(d) for n, d in sorted(hf_dtypes.items()) if d != default}}


def _ensure_process_group() -> bool:
    """Start a one-rank process group (in-memory store, no port) unless torch.distributed is
    already up or this is a multi-process launch; True if we started it (the caller tears down)."""
    from datetime import timedelta

    if dist.is_initialized():
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return True  # torchrun: init_distributed joins the launch's rendezvous
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                            timeout=timedelta(minutes=30))
    return True


def convert_hf_to_megatron(hf_dir: str, out_dir: str, *, tp: int = 1, pp: int = 1, ep: int = 1,
                           etp: int | None = None, dtype: str = "auto", writer: str = "auto",
                           overwrite: bool = False, log=print) -> str:
    """Convert; returns the output directory. Collective when run under torchrun.

    ``writer``: ``stream`` (one process: a meta-device model gives the structure, HF tensors are
    streamed into the files, ``torch_dist_writer``), ``model`` (build this rank's model at the
    layout, fill it, save it), ``auto`` (stream in one process at TP1/PP1/EP1, model otherwise).
    """
    from gmpo_megatron.megatron.parallel import destroy_distributed, init_distributed

    hf_dir = os.path.abspath(hf_dir)
    hf_config = load_hf_config(hf_dir)
    check_hf_config(hf_config)
    mapping = get_mapping(hf_config)
    ckpt = open_hf_checkpoint(hf_dir)
    check_hf_tensors(ckpt, mapping)
    hf_dtypes = {name: ckpt.dtype(name) for name in mapping.hf_names()}
    params_dtype = choose_params_dtype(hf_dtypes, dtype)
    staged = StagedDir(out_dir, overwrite=overwrite)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if writer == "auto":
        writer = "stream" if world == 1 and (tp, pp, ep, etp or tp) == (1, 1, 1, 1) else "model"
    if writer not in ("stream", "model"):
        raise ConversionError(f"writer {writer!r} is not one of 'auto', 'stream', 'model'")
    if writer == "stream" and (world > 1 or (tp, pp, ep, etp or tp) != (1, 1, 1, 1)):
        raise ConversionError("the stream writer runs in one process at TP1/PP1/EP1 (the output "
                              "loads at any layout anyway); use --writer model with a layout")

    started = _ensure_process_group()
    try:
        layout = init_distributed(tp=tp, pp=pp, ep=ep, etp=etp)
        rank0 = layout.rank == 0
        if rank0:
            log(f"hf-to-megatron: {hf_config.model_type}, {len(hf_dtypes)} HF tensors "
                f"({ckpt.total_bytes() / 1e9:.2f} GB), {writer} writer, layout tp={layout.tp} "
                f"pp={layout.pp} ep={layout.ep} etp={layout.etp} on {layout.world_size} "
                f"process(es), params {dtype_name(params_dtype)}")
        try:
            if rank0:
                staged.prepare()
            dist.barrier()
            if writer == "stream":
                _write_streaming(hf_config, mapping, ckpt, params_dtype, staged.path)
            else:
                _write_from_model(hf_config, mapping, ckpt, params_dtype, staged.path,
                                  tp=tp, pp=pp, ep=ep, etp=etp)
            dist.barrier()
            if rank0:
                os.makedirs(os.path.join(staged.path, HF_SUBDIR))
                copied = copy_model_files(hf_dir, os.path.join(staged.path, HF_SUBDIR))
                staged.commit({
                    "kind": MEGATRON_KIND, "source": hf_dir, "model_type": hf_config.model_type,
                    "writer": writer,
                    "saved_at_layout": {"tp": layout.tp, "pp": layout.pp, "ep": layout.ep,
                                        "etp": layout.etp, "world_size": layout.world_size},
                    "params_dtype": dtype_name(params_dtype), "hf_dtypes": _dtype_record(hf_dtypes),
                    "hf_tensors": len(hf_dtypes), "hf_files": copied,
                    "megatron_core": _megatron_version(),
                })
                log(f"hf-to-megatron: wrote {staged.final}")
            dist.barrier()
        except BaseException:
            if rank0:
                staged.abort()
            raise
    finally:
        ckpt.close()
        if started:
            destroy_distributed()
    return staged.final


def _write_from_model(hf_config, mapping, ckpt, params_dtype, directory, **layout) -> None:
    """This rank's model at the layout, filled by ``load_hf_weights`` (each rank reads only its
    tensors), saved by dist_checkpointing. Memory: this rank's share of the model."""
    from gmpo_megatron.megatron.model_builder import build_model
    from gmpo_megatron.megatron.weights import load_hf_weights

    model = build_model(hf_config, converter_build_options(params_dtype=params_dtype, **layout))
    check_megatron_config(hf_config, model)
    load_hf_weights(model, mapping, ckpt.read)
    save_megatron_model(model, directory)


def _write_streaming(hf_config, mapping, ckpt, params_dtype, directory) -> None:
    """Structure from a meta-device model, data streamed from the HF files (one chunk at a time)."""
    from gmpo_megatron.convert.torch_dist_writer import HFChunkSource, save_streaming
    from gmpo_megatron.megatron.model_builder import build_model

    with torch.device("meta"):
        meta_model = build_model(hf_config, converter_build_options(params_dtype=params_dtype))
    check_megatron_config(hf_config, meta_model)
    source = HFChunkSource(mapping, ckpt)
    save_streaming(meta_model, source, directory)
    unused = sorted(set(mapping.hf_names()) - source.names_read)
    if unused:
        raise ConversionError(f"the checkpoint structure never asked for HF tensor(s) {unused[:8]}: "
                              "the Megatron model and the mapping disagree")


def _megatron_version() -> str:
    try:
        from importlib.metadata import version

        return version("megatron-core")
    except Exception:  # pragma: no cover
        return "unknown"


__all__ = ["ConversionError", "convert_hf_to_megatron", "choose_params_dtype", "parse_dtype"]
