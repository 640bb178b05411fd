"""Micro-batches split over context-parallel ranks: Megatron's 2*CP load-balanced layout.

The model input of a micro-batch (``tokens [b, S]``, padded or packed) is split along the sequence:
CP rank r keeps chunks r and 2*CP-1-r of every row (``algo.context_parallel.cp_chunk_positions``),
so ``S`` is padded to a multiple of 2*CP (times the TP size under sequence parallelism, which
splits the rank's part again). This is the layout Megatron's CP expects everywhere: the rotary
table of the rank's chunks (``get_pos_emb_on_this_cp_rank``), Transformer-Engine's CP attention on
GPU, and ``megatron.cp_attention`` (the local spec's) on CPU.

Packed rows. A packed row (THD: sequences back to back, a block-diagonal causal mask) is split as
one row, not sequence by sequence as Transformer-Engine's THD kernels do. This is exact, not an
approximation: the mask rows a rank keeps are the full mask's rows at its positions (keys at all
global positions), so every token still attends to exactly the earlier tokens of its own sequence;
and the rotary position of a token is its position in the row, as without CP, so relative
positions inside each sequence are unchanged. It needs no per-sequence padding and uses Megatron's
own rotary split. (What the per-sequence split would buy, an even causal workload per rank, does
not apply to the all-gather attention, which scores every local query against every key.)

The loss input (``[B, R]``, one row per sequence) is not split: each rank computes the log-probs of
the response tokens whose logits it holds (``CPShard.logit_owned``), and
``algo.context_parallel.merge_disjoint_over_context_parallel`` assembles the full ``[B, R]`` on
every CP rank, so the per-sequence sums before GMPO's ``exp`` are exact (train_step.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from gmpo_megatron.algo.context_parallel import cp_chunk_positions


@dataclass(frozen=True)
class CPShard:
    """Where this CP rank's part of a micro-batch sits in the unsplit one.

    positions    [S/CP]  the row positions this rank holds, in local order
    seq_len      S       the unsplit row length (spans and routes refer to it)
    logit_owned  [B, R]  True where this rank holds the logit of response token j of sequence i
    """

    size: int
    rank: int
    positions: torch.Tensor
    seq_len: int
    logit_owned: torch.Tensor


def cp_seq_multiple(cp_size: int, sp_size: int = 1) -> int:
    """The multiple the unsplit row length must have: 2*CP chunks, and each rank's S/CP tokens
    divisible by the sequence-parallel (TP) size."""
    return math.lcm(2 * cp_size, cp_size * sp_size)


def split_for_context_parallel(batch, cp_size: int, cp_rank: int):
    """This CP rank's part of ``batch`` (a ``MicroBatch`` of ``micro_batches.py``): the model input
    at its positions (the packed mask keeps this rank's query rows and every key column), the
    logit index into its own output, and a ``CPShard``. The loss tensors stay whole."""
    if cp_size == 1:
        return batch
    if batch.cp is not None:
        raise ValueError("this micro-batch is already split over context-parallel ranks")
    rows, seq_len = batch.tokens.shape
    positions = cp_chunk_positions(seq_len, cp_size, cp_rank).to(batch.tokens.device)
    local_of = torch.full((seq_len,), -1, dtype=torch.long, device=positions.device)
    local_of[positions] = torch.arange(positions.numel(), device=positions.device)
    row, position = batch.logit_index // seq_len, batch.logit_index % seq_len
    local = local_of[position]
    owned = local >= 0
    logit_index = torch.where(owned, row * positions.numel() + local, 0)
    mask = batch.attention_mask
    if mask is not None:  # [b, 1, S, S] -> this rank's query rows, all key columns (global order)
        mask = mask.index_select(2, positions)
    shard = CPShard(cp_size, cp_rank, positions, seq_len, owned)
    return replace(batch, tokens=batch.tokens[:, positions].contiguous(),
                   position_ids=batch.position_ids[:, positions].contiguous(), attention_mask=mask,
                   logit_index=logit_index, cp=shard)
