"""The live, sharded model -> full tensors, in buckets, only on the ranks that use them.

Weight sync needs one full copy of the model, on one rank per pipeline stage (its *sender*: TP,
DP and CP rank 0, which writes the stage's safetensors or broadcasts it into SGLang) or on global
rank 0 alone (the embedded engine). Every other data-parallel replica holds the same weights, so
it takes no part. Within a stage:

- non-expert tensors: the sender's TP group gathers each bucket of TP shards to the sender (one
  ``gather`` of one flat byte buffer per bucket); replicated tensors are read locally;
- expert tensors: the ranks of expert-data-parallel rank 0 gather over their expert-TP group to
  its rank 0, then those over the expert-parallel group to the sender (EP rank r owns global
  experts ``[r*E/EP, (r+1)*E/EP)``).

A bucket is a run of consecutive tensors of one kind (expert or not) whose full size, as the
sender ends up holding it, is at most ``bucket_bytes`` (a larger tensor goes alone); tensors are
yielded in ``weights._stage_metadata`` order, so the sync writers' plans hold. Across pipeline
stages (``HFWeightGather``, the embedded engine) each stage's sender sends its full tensors to
global rank 0 in buckets of the same bound, one point-to-point message each. Memory on the sender:
about two buckets (the gathered pieces and the unsharded tensors).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

from gmpo_megatron.megatron.weights import _EXPERT, _live_params, _stage_metadata, shard_info, unshard_tensor, unwrap
from gmpo_megatron.models.base import QwenMapping

DEFAULT_BUCKET_BYTES = 256 << 20
_ALIGN = 16  # every tensor starts at a 16-byte offset of a bucket buffer (viewed in place as its dtype)


def is_stage_sender() -> bool:
    """TP, DP and CP rank 0 of its pipeline stage: the rank that holds the stage's full tensors."""
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
            and ps.get_context_parallel_rank() == 0)


def plan_buckets(sizes: Sequence[int], kinds: Sequence[bool], bucket_bytes: int) -> list[list[int]]:
    """Consecutive indices of one kind whose ``sizes`` sum to at most ``bucket_bytes`` (a larger
    one alone), in order."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes={bucket_bytes}; it must be >= 1")
    buckets: list[list[int]] = []
    total = 0
    for i, (size, kind) in enumerate(zip(sizes, kinds)):
        if buckets and (kinds[buckets[-1][0]] == kind and total + size <= bucket_bytes):
            buckets[-1].append(i)
            total += size
        else:
            buckets.append([i])
            total = size
    return buckets


def _layout(tensors: Sequence[torch.Tensor] | Sequence[tuple[tuple[int, ...], torch.dtype]]):
    """(byte offset, nbytes) of each tensor (or (shape, dtype)) in a bucket buffer; total size."""
    out, end = [], 0
    for t in tensors:
        shape, dtype = (tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else t
        nbytes = dtype.itemsize * (int(torch.Size(shape).numel()))
        start = -(-end // _ALIGN) * _ALIGN
        out.append((start, nbytes))
        end = start + nbytes
    return out, end


def flatten(tensors: Sequence[torch.Tensor], device=None) -> torch.Tensor:
    """One ``uint8`` buffer holding every tensor's bytes at its ``_layout`` offset."""
    layout, total = _layout(tensors)
    buffer = torch.empty(total, dtype=torch.uint8, device=device or (tensors[0].device if tensors else "cpu"))
    for t, (start, nbytes) in zip(tensors, layout):
        buffer[start:start + nbytes].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
    return buffer


def unflatten(buffer: torch.Tensor, specs: Sequence[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.Tensor]:
    """Views of ``buffer`` (from ``flatten``) with each spec's shape and dtype."""
    layout, total = _layout(specs)
    if buffer.numel() != total:
        raise ValueError(f"a bucket of these tensors has {total} bytes, the buffer {buffer.numel()}")
    return [buffer[start:start + nbytes].view(dtype).reshape(shape)
            for (shape, dtype), (start, nbytes) in zip(specs, layout)]


def _gather_to_first(tensors: list[torch.Tensor], group) -> list[list[torch.Tensor]] | None:
    """Every rank of ``group`` passes same-shaped ``tensors``; its first rank gets, per tensor,
    every rank's piece in group order (one ``gather`` of one buffer), the others None."""
    ranks = dist.get_process_group_ranks(group)
    flat = flatten(tensors)
    first = dist.get_rank() == ranks[0]
    pieces = [torch.empty_like(flat) for _ in ranks] if first else None
    dist.gather(flat, pieces, dst=ranks[0], group=group)
    if not first:
        return None
    specs = [(tuple(t.shape), t.dtype) for t in tensors]
    views = [unflatten(p, specs) for p in pieces]
    return [[v[j] for v in views] for j in range(len(tensors))]


def _stage_entries(model_chunks, experts: bool | None):
    entries = []
    for live_name, param, chunk in _live_params(model_chunks):
        info = shard_info(live_name, param, chunk)
        if info is None or (experts is not None and info.is_expert != experts):
            continue
        entries.append((info, param, chunk))
    return entries


@torch.no_grad()
def gather_stage(model_chunks, experts: bool | None = None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Iterator[tuple[str, torch.Tensor]]:
    """(global canonical name, full tensor) of this pipeline stage, in ``_stage_metadata(model,
    experts)`` order, yielded on the stage's sender only (module docstring). Collective over the
    stage: every rank of it runs the iterator to the end (the ranks that take no part in any
    gather return at once)."""
    from megatron.core import parallel_state as ps

    entries = _stage_entries(model_chunks, experts)
    tp_group, etp_group = ps.get_tensor_model_parallel_group(), ps.get_expert_tensor_parallel_group()
    tp, etp = dist.get_world_size(tp_group), dist.get_world_size(etp_group)
    ep_group, ep = ps.get_expert_model_parallel_group(), ps.get_expert_model_parallel_world_size()
    sender = is_stage_sender()
    dense_part = ps.get_data_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0
    expert_part = ps.get_expert_data_parallel_rank() == 0
    etp_first = ps.get_expert_tensor_parallel_rank() == 0
    if sender and not (expert_part and etp_first and ps.get_expert_model_parallel_rank() == 0):
        raise RuntimeError("the stage's sender (TP/DP/CP rank 0) is not expert-TP/EP/expert-DP rank 0: "
                           "an unexpected Megatron rank order (expected tp-cp-ep-dp-pp)")
    sizes = []
    for info, param, _ in entries:
        size = param.numel() * param.element_size()
        if info.tp_dim is not None:
            size *= etp if info.is_expert else tp
        sizes.append(size * (ep if info.is_expert else 1))
    for bucket in plan_buckets(sizes, [info.is_expert for info, _, _ in entries], bucket_bytes):
        if entries[bucket[0]][0].is_expert:
            if expert_part:
                yield from _expert_bucket([entries[k] for k in bucket], etp_group, etp, etp_first, ep_group, ep,
                                          sender)
        elif dense_part:
            yield from _dense_bucket([entries[k] for k in bucket], tp_group, tp, sender)


def _unshard(entries, group, size) -> list[torch.Tensor] | None:
    """Full (over ``group``) tensors of ``entries`` on the group's first rank, None elsewhere."""
    sharded = [k for k, (info, _, _) in enumerate(entries) if info.tp_dim is not None and size > 1]
    pieces = dict(zip(sharded, _gather_to_first([entries[k][1] for k in sharded], group) or [])) if sharded else {}
    if sharded and not pieces:
        return None  # not the first rank
    return [unshard_tensor(pieces[k], info) if k in pieces else param.detach()
            for k, (info, param, _) in enumerate(entries)]


def _dense_bucket(entries, tp_group, tp, sender):
    full = _unshard(entries, tp_group, tp)
    if sender:
        yield from ((info.global_name, tensor) for (info, _, _), tensor in zip(entries, full))


def _expert_bucket(entries, etp_group, etp, etp_first, ep_group, ep, sender):
    full = _unshard(entries, etp_group, etp)
    if not etp_first:
        return  # an expert-TP rank > 0: its shards are gathered, nothing more
    per_rank = _gather_to_first(full, ep_group) if ep > 1 else [[t] for t in full]
    if not sender:
        return
    for (info, _, chunk), pieces in zip(entries, per_rank):
        local_experts = unwrap(chunk).config.num_moe_experts // ep
        own = int(_EXPERT.search(info.global_name).group(1)) % local_experts
        for ep_rank, piece in enumerate(pieces):
            yield _EXPERT.sub(f".local_experts.{ep_rank * local_experts + own}.", info.global_name), piece


class HFWeightGather:
    """The whole model as HF-named tensors on global rank 0 (the embedded engine's rank), bucketed
    (module docstring). Build it on every rank; ``stream()`` is collective: run it to the end on
    every rank (it yields only on global rank 0)."""

    def __init__(self, model_chunks, mapping: QwenMapping, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 device: torch.device | None = None) -> None:
        self.model, self.mapping, self.bucket_bytes = model_chunks, mapping, bucket_bytes
        self.device = device or torch.device("cpu")
        self._stage_specs: list | None = None  # rank 0: every stage's (name, shape, dtype), once

    def stream(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self._megatron_stream():
            if self.mapping.tied and name == "output_layer.weight":
                continue  # the last stage's copy of the tied embedding
            yield from self.mapping.to_hf(name, tensor)

    def _megatron_stream(self) -> Iterator[tuple[str, torch.Tensor]]:
        from megatron.core import parallel_state as ps

        pp = ps.get_pipeline_model_parallel_world_size()
        own = gather_stage(self.model, None, self.bucket_bytes)
        if pp == 1:
            yield from own
            return
        rank, sender = dist.get_rank(), is_stage_sender()
        group = ps.get_pipeline_model_parallel_group()  # a sender's: the senders of every stage
        senders = dist.get_process_group_ranks(group)
        if sender and self._stage_specs is None:
            specs = [(name, shape, dtype) for name, shape, dtype in _stage_metadata(self.model)]
            everyone = [None] * pp if rank == 0 else None
            dist.gather_object(specs, everyone, dst=senders[0], group=group)
            self._stage_specs = everyone if rank == 0 else []
        if rank == 0:
            yield from own
            for stage in range(1, pp):
                specs = self._stage_specs[stage]
                for bucket in self._buckets(specs):
                    shapes = [(specs[k][1], specs[k][2]) for k in bucket]
                    buffer = torch.empty(_layout(shapes)[1], dtype=torch.uint8, device=self.device)
                    dist.recv(buffer, src=senders[stage], group=group)
                    for k, tensor in zip(bucket, unflatten(buffer, shapes)):
                        yield specs[k][0], tensor
        elif sender:
            specs = _stage_metadata(self.model)
            for bucket in self._buckets(specs):
                tensors = []
                for k in bucket:
                    name, tensor = next(own)
                    if name != specs[k][0] or tuple(tensor.shape) != tuple(specs[k][1]):
                        raise RuntimeError(f"stage tensor {name} {tuple(tensor.shape)} does not match its "
                                           f"announced {specs[k][0]} {specs[k][1]}")
                    tensors.append(tensor)
                dist.send(flatten(tensors, device=self.device), dst=0, group=group)
            for extra in own:
                raise RuntimeError(f"stage tensor {extra[0]} was not announced")
        else:
            for _ in own:  # take part in the stage's gathers
                pass

    def _buckets(self, specs) -> list[list[int]]:
        sizes = [dtype.itemsize * int(torch.Size(shape).numel()) for _, shape, dtype in specs]
        return plan_buckets(sizes, [False] * len(specs), self.bucket_bytes)
