"""Move weights between HF tensors and the live, sharded Megatron model.

``load_hf_weights`` fills this rank's shards from HF tensors (each rank reads only the tensors it
needs); ``iter_hf_weights`` gathers full tensors across TP / ETP / EP / PP and yields them under HF
names on global rank 0 (streaming: one Megatron tensor at a time). Both use the architecture
mapping in ``gmpo_megatron.models`` for names and transforms, and the shard metadata Megatron
attaches to its parameters (``tensor_model_parallel``, ``partition_dim``) for the splits.

Sharding rules (Megatron-Core's layout; the layout tests of tests/e2e/test_train_cli.py check them): column-parallel tensors (QKV, fc1, embedding, output layer) split
on dim 0, row-parallel (linear_proj, fc2) on dim 1; the fc1 shard of TP rank r is
``[gate_shard_r; up_shard_r]``, not a chunk of ``[gate; up]``; experts use the expert-TP group and
EP rank r owns global experts ``[r*E/EP, (r+1)*E/EP)``; PP stage s owns a contiguous layer range.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gmpo_megatron.models import canonical_name
from gmpo_megatron.models.base import QwenMapping

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")


@dataclass(frozen=True)
class ShardInfo:
    """Where this rank's piece of one parameter sits in the full tensor."""

    global_name: str  # canonical name with global layer / expert indices
    is_expert: bool
    tp_dim: int | None  # None: replicated over the (expert-)TP group
    glu: bool  # fc1 of a gated MLP: shard = [gate_r; up_r]


def unwrap(model):
    """The bare GPTModel under DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def shard_info(live_name: str, param: torch.nn.Parameter, model) -> ShardInfo | None:
    """Global canonical name and split of a live parameter; None for ``_extra_state``."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    name = canonical_name(live_name)
    if name is None:
        return None
    gpt = unwrap(model)
    config = gpt.config
    match = _LAYER.match(name)
    if match:
        offset = get_transformer_layer_offset(config, vp_stage=getattr(gpt, "vp_stage", None))
        name = f"decoder.layers.{int(match.group(1)) + offset}." + name[match.end():]
    is_expert = ".mlp.experts." in name
    if is_expert:
        local_experts = config.num_moe_experts // ps.get_expert_model_parallel_world_size()
        first = ps.get_expert_model_parallel_rank() * local_experts

        def to_global(m: re.Match) -> str:
            return f".local_experts.{int(m.group(1)) + first}."

        name = _EXPERT.sub(to_global, name)
    return ShardInfo(name, is_expert, _partition_dim(live_name, param, gpt),
                     name.endswith("linear_fc1.weight"))


def _partition_dim(live_name: str, param: torch.nn.Parameter, gpt) -> int | None:
    """The TP split dimension. Megatron tags parallel weights (``tensor_model_parallel``,
    ``partition_dim``) only inside its init helpers, which ``perform_initialization=False`` skips
    on the local spec: fall back to the owning layer's type."""
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
    )

    if getattr(param, "tensor_model_parallel", False):
        return param.partition_dim
    module = gpt.get_submodule(live_name.rsplit(".", 1)[0])
    if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
        return 0
    if isinstance(module, RowParallelLinear) and live_name.endswith(".weight"):
        return 1
    return None


def _tp_group(info: ShardInfo):
    from megatron.core import parallel_state as ps

    if info.is_expert:
        return ps.get_expert_tensor_parallel_group()
    return ps.get_tensor_model_parallel_group()


def shard_tensor(full: torch.Tensor, info: ShardInfo, rank: int, size: int) -> torch.Tensor:
    """This rank's piece of ``full`` along the TP dimension."""
    if info.tp_dim is None or size == 1:
        return full
    if info.glu:
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)
    return full.chunk(size, dim=info.tp_dim)[rank]


def unshard_tensor(pieces: list[torch.Tensor], info: ShardInfo) -> torch.Tensor:
    """Inverse of :func:`shard_tensor` given every rank's piece in rank order."""
    if info.tp_dim is None or len(pieces) == 1:
        return pieces[0]
    if info.glu:
        halves = [torch.chunk(p, 2, dim=0) for p in pieces]
        return torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
    return torch.cat(pieces, dim=info.tp_dim)


def _live_params(model_chunks) -> list[tuple[str, torch.nn.Parameter, object]]:
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    out = []
    for chunk in chunks:
        for name, param in unwrap(chunk).named_parameters():
            out.append((name, param, chunk))
    return out


@torch.no_grad()
def load_hf_weights(model_chunks, mapping: QwenMapping,
                    read_hf: Callable[[str], torch.Tensor]) -> int:
    """Fill every local parameter from HF tensors; returns the number of parameters loaded.

    ``read_hf(name)`` returns one HF tensor (full, unsharded); it is called only for the tensors
    this rank needs. Shapes are checked against the mapping's expectations and the live shard.
    """
    from megatron.core import parallel_state as ps

    expected = mapping.expected_hf_shapes()
    count = 0
    for live_name, param, chunk in _live_params(model_chunks):
        info = shard_info(live_name, param, chunk)
        if info is None:
            continue
        name = info.global_name
        if mapping.tied and name == "output_layer.weight":
            name = "embedding.word_embeddings.weight"  # the last stage's copy of the tied weight
        group = mapping.group_of(name)
        tensors = []
        for hf_name in group.hf_names:
            tensor = read_hf(hf_name)
            if tuple(tensor.shape) != expected[hf_name]:
                raise ValueError(
                    f"HF tensor {hf_name} has shape {tuple(tensor.shape)}, expected "
                    f"{expected[hf_name]} for this config: the checkpoint does not match the config"
                )
            tensors.append(tensor)
        full = mapping.to_megatron(name, tensors)
        if info.is_expert:
            rank, size = ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()
        else:
            rank, size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
        piece = shard_tensor(full, info, rank, size)
        if piece.shape != param.shape:
            raise ValueError(f"{live_name}: shard shape {tuple(piece.shape)} != parameter shape "
                             f"{tuple(param.shape)} (layout or config mismatch)")
        param.data.copy_(piece.to(param.dtype))
        # Megatron keeps fp32 master copies of bf16 params in the optimizer; callers load before
        # building the optimizer (or reload the optimizer's main params after).
        count += 1
    return count


def _gather_tp(tensor: torch.Tensor, info: ShardInfo) -> torch.Tensor:
    group = _tp_group(info)
    size = dist.get_world_size(group)
    if info.tp_dim is None or size == 1:
        return tensor
    pieces = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(pieces, tensor.contiguous(), group=group)
    return unshard_tensor(pieces, info)


def _stage_tensors(model_chunks, experts: bool | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Full (TP- and EP-gathered) tensors of this pipeline stage, under global names; only the
    expert (``experts=True``) or only the non-expert tensors (``False``) when asked.

    Collective over the stage's TP / ETP / EP groups: every rank of the stage iterates the same
    parameters in the same order (the live names are identical across those ranks)."""
    from megatron.core import parallel_state as ps

    ep_group = ps.get_expert_model_parallel_group()
    ep = ps.get_expert_model_parallel_world_size()
    for live_name, param, chunk in _live_params(model_chunks):
        info = shard_info(live_name, param, chunk)
        if info is None or (experts is not None and info.is_expert != experts):
            continue
        full = _gather_tp(param.detach(), info)
        if not info.is_expert or ep == 1:
            yield info.global_name, full
            continue
        pieces = [torch.empty_like(full) for _ in range(ep)]
        dist.all_gather(pieces, full.contiguous(), group=ep_group)
        local_experts = unwrap(chunk).config.num_moe_experts // ep
        own = int(_EXPERT.search(info.global_name).group(1)) % local_experts
        for ep_rank, piece in enumerate(pieces):
            yield _EXPERT.sub(f".local_experts.{ep_rank * local_experts + own}.", info.global_name), piece


def _stage_metadata(model_chunks, experts: bool | None = None) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(global name, full shape, dtype) of every tensor ``_stage_tensors(model_chunks, experts)``
    yields, in its order, computed from local shapes (no communication, no gathering)."""
    from megatron.core import parallel_state as ps

    ep = ps.get_expert_model_parallel_world_size()
    meta = []
    for live_name, param, chunk in _live_params(model_chunks):
        info = shard_info(live_name, param, chunk)
        if info is None or (experts is not None and info.is_expert != experts):
            continue
        shape = list(param.shape)
        if info.tp_dim is not None:
            shape[info.tp_dim] *= dist.get_world_size(_tp_group(info))
        if not info.is_expert or ep == 1:
            meta.append((info.global_name, tuple(shape), param.dtype))
            continue
        local_experts = unwrap(chunk).config.num_moe_experts // ep
        own = int(_EXPERT.search(info.global_name).group(1)) % local_experts
        for ep_rank in range(ep):
            name = _EXPERT.sub(f".local_experts.{ep_rank * local_experts + own}.", info.global_name)
            meta.append((name, tuple(shape), param.dtype))
    return meta


@torch.no_grad()
def iter_full_megatron_weights(model_chunks) -> Iterator[tuple[str, torch.Tensor]]:
    """(global canonical name, full tensor) for the whole model. Collective: call it on every
    rank; every rank receives every tensor (PP stages broadcast theirs over the pipeline group).

    Streaming: one gathered tensor group (a parameter, or one local expert's EP gather) is held at
    a time; each stage announces its tensor list once, from local shapes."""
    from megatron.core import parallel_state as ps

    pp = ps.get_pipeline_model_parallel_world_size()
    if pp == 1:
        yield from _stage_tensors(model_chunks)
        return
    pp_group = ps.get_pipeline_model_parallel_group()
    pp_rank = ps.get_pipeline_model_parallel_rank()
    ranks = dist.get_process_group_ranks(pp_group)
    for stage in range(pp):
        own = stage == pp_rank
        box = [_stage_metadata(model_chunks) if own else None]
        dist.broadcast_object_list(box, src=ranks[stage], group=pp_group)
        local = _stage_tensors(model_chunks) if own else None
        for name, shape, dtype in box[0]:
            if own:
                local_name, tensor = next(local)
                if local_name != name or tuple(tensor.shape) != shape:
                    raise RuntimeError(f"stage tensor {local_name} {tuple(tensor.shape)} does not match "
                                       f"its announced {name} {shape}")
                tensor = tensor.contiguous()
            else:
                tensor = torch.empty(shape, dtype=dtype, device=_device())
            dist.broadcast(tensor, src=ranks[stage], group=pp_group)
            yield name, tensor


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else (
        torch.device("cpu"))


def iter_hf_weights(model_chunks, mapping: QwenMapping) -> Iterator[tuple[str, torch.Tensor]]:
    """Full HF-named tensors of the live model. Collective: call on every rank; every rank yields
    the same tensors (gathered), so the caller decides which rank uses them.

    Tied models yield no ``lm_head.weight``; the last stage's copy of the tied embedding is skipped.
    """
    for name, tensor in iter_full_megatron_weights(model_chunks):
        if mapping.tied and name == "output_layer.weight":
            continue
        yield from mapping.to_hf(name, tensor)
