"""Context parallelism for sequence-level losses: the split, and the exact reduction before exp.

Megatron splits every sequence over the CP ranks in 2*CP chunks, load-balanced for causal
attention: rank r holds chunks r and 2*CP-1-r (the early, cheap chunk with the late, costly one).
A token-level loss can be summed per rank, but GMPO's ratio ``r_i = exp(sum_t d~_t / |o_i|)`` needs
the *whole* sequence's sum before the exp, as does any per-sequence mean (GRPO's 1/|o_i|, GSPO).

``gather_from_context_parallel`` puts each rank's per-token values (log-probs: one float per token,
cheap next to the logits) back into full sequences on every CP rank. Its backward returns the
gradient of the rank's *own* positions only, not a sum over ranks, so:

- every CP rank computes the same, exact, unsplit loss (``policy_loss`` unchanged);
- the gradient each rank sends into its model is d loss / d (its own tokens);
- summing parameter gradients over CP ranks (Megatron's DP x CP gradient all-reduce) gives
  exactly the gradient of the unsplit loss, counted once.

The loss normaliser must count each sequence once, e.g. on CP rank 0 only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def cp_chunk_positions(seq_len: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions ``[seq_len / cp_size]`` of a sequence that CP rank ``cp_rank`` holds.

    ``seq_len`` must be a multiple of ``2 * cp_size`` (Megatron pads sequences to that)."""
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank={cp_rank} must lie in [0, cp_size={cp_size})")
    if seq_len % (2 * cp_size):
        raise ValueError(
            f"sequence length {seq_len} is not a multiple of 2 * cp_size = {2 * cp_size}: pad "
            "each sequence to a multiple of 2*CP before splitting (as Megatron does)"
        )
    chunk = seq_len // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * chunk, (2 * cp_size - cp_rank) * chunk)
    return torch.cat([first, second])


def packed_cp_positions(cu_seqlens: list[int], cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions in a packed (THD) row that CP rank ``cp_rank`` holds: every sequence
    ``[cu_seqlens[k], cu_seqlens[k+1])`` is split on its own, as Megatron/TE split THD batches."""
    parts = []
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        parts.append(cp_chunk_positions(end - start, cp_size, cp_rank) + start)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


class _GatherOwnGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, all_positions, full_len, group):
        ctx.own = all_positions[dist.get_rank(group)]
        pieces = [torch.empty_like(local) for _ in all_positions]
        dist.all_gather(pieces, local.contiguous(), group=group)
        full = local.new_zeros(local.shape[:-1] + (full_len,))
        for positions, piece in zip(all_positions, pieces):
            full[..., positions] = piece
        return full

    @staticmethod
    def backward(ctx, grad_full):
        return grad_full[..., ctx.own], None, None, None


def gather_from_context_parallel(local: torch.Tensor, positions: torch.Tensor, full_len: int,
                                 group) -> torch.Tensor:
    """``local [..., n]`` (this rank's values at ``positions``) -> ``[..., full_len]`` with every
    rank's values in place, on every rank of ``group``. Differentiable: the gradient w.r.t.
    ``local`` is that of the full tensor at this rank's own positions (no sum over ranks)."""
    size = dist.get_world_size(group)
    if local.shape[-1] != positions.numel():
        raise ValueError(f"local has {local.shape[-1]} positions, positions lists {positions.numel()}")
    counts = [torch.zeros(1, dtype=torch.long) for _ in range(size)]
    dist.all_gather(counts, torch.tensor([positions.numel()]), group=group)
    if len({int(c) for c in counts}) != 1:
        raise ValueError(f"CP ranks hold different numbers of positions {[int(c) for c in counts]}; "
                         "the 2*CP split gives every rank the same count")
    all_positions = [torch.empty_like(positions) for _ in range(size)]
    dist.all_gather(all_positions, positions.contiguous(), group=group)
    covered = torch.cat(all_positions)
    if covered.numel() != full_len or not torch.equal(covered.sort().values, torch.arange(full_len)):
        raise ValueError(f"the CP ranks' positions do not cover [0, {full_len}) exactly once")
    return _GatherOwnGrad.apply(local, all_positions, full_len, group)


class _MergeOwnGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, part, group):
        merged = part.clone()
        dist.all_reduce(merged, group=group)
        return merged

    @staticmethod
    def backward(ctx, grad_merged):
        return grad_merged, None


def merge_disjoint_over_context_parallel(part: torch.Tensor, group) -> torch.Tensor:
    """Every CP rank's ``part`` summed, where the ranks fill *disjoint* entries and leave the rest
    exactly 0 (e.g. the ``[B, R]`` log-probs of the response tokens whose logits each rank holds;
    unlike ``gather_from_context_parallel`` the ranks may hold different numbers of entries).

    x + 0 is exact, so the result is bit-equal to the unsplit tensor. Backward: the gradient of
    the merged tensor passes through unchanged (no sum over ranks), as in
    ``gather_from_context_parallel``: every rank computes the same loss from the merged tensor,
    and the entries a rank did not fill carry no graph, so it sends d loss / d (its own entries)
    into its model only."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:  # group None: the world
        return part
    return _MergeOwnGrad.apply(part, group)
