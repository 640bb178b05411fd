"""Packed micro-batches for Transformer-Engine attention: THD ``PackedSeqParams``.

Megatron's local spec has no THD kernel, so a packed row ``tokens [1, T]`` carries a
block-diagonal causal mask (``micro_batches.py``). Transformer-Engine's fused attention takes the
sequence boundaries instead, as Megatron's ``PackedSeqParams(qkv_format="thd")``:

    cu_seqlens          [n + 1] int32  0, l_0, l_0 + l_1, ..., sum_i l_i   (real tokens)
    cu_seqlens_padded   [n + 1] int32  the same, but ending at T: the row's tail padding (to a
                                       multiple of the sequence-parallel size) belongs to the last
                                       sequence as its padding, which TE's attention skips
    max_seqlen                         the longest padded sequence

(``_q`` and ``_kv`` are equal: self-attention.) RoPE restarts at 0 at each ``cu_seqlens_padded``
boundary, as the padded layout's per-row positions do, and the mask is dropped (TE builds the
per-sequence causal mask from the boundaries).

Status: built and tested on CPU against the micro-batch's spans (tests/megatron/test_packed_seq.py);
the trainer still refuses ``train.packing=true`` with the TE spec until a GPU run shows THD equal to
padded micro-batches (benchmarks/gpu_check.py compares them; docs/gpu-results.md).
"""

from __future__ import annotations

import dataclasses

import torch

from gmpo_megatron.megatron.micro_batches import MicroBatch


def thd_boundaries(batch: MicroBatch) -> tuple[list[int], list[int]]:
    """``(cu_seqlens, cu_seqlens_padded)`` of a packed micro-batch, from its spans and row length.

    Refuses anything but one row of back-to-back sequences starting at 0 (what
    ``build_micro_batch(packed=True)`` makes)."""
    rows, total = batch.tokens.shape
    if rows != 1:
        raise ValueError(f"THD needs a packed micro-batch (one row); this one has {rows} rows: build "
                         "it with build_micro_batch(..., packed=True)")
    cu_seqlens = [0]
    for row, start, length in batch.spans:
        if row != 0 or start != cu_seqlens[-1] or length < 1:
            raise ValueError(f"span {(row, start, length)} does not follow the previous sequence "
                             f"(which ends at {cu_seqlens[-1]}): THD sequences lie back to back in row 0")
        cu_seqlens.append(start + length)
    if cu_seqlens[-1] > total:
        raise ValueError(f"the sequences hold {cu_seqlens[-1]} tokens, more than the row's {total}")
    padded = cu_seqlens[:-1] + [total]
    return cu_seqlens, padded


def packed_seq_params(batch: MicroBatch):
    """Megatron's ``PackedSeqParams`` (THD) for a packed micro-batch, on its device."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu_seqlens, padded = thd_boundaries(batch)
    device = batch.tokens.device
    as_tensor = lambda values: torch.tensor(values, dtype=torch.int32, device=device)  # noqa: E731
    longest = max(b - a for a, b in zip(padded[:-1], padded[1:]))
    real, pad = as_tensor(cu_seqlens), as_tensor(padded)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=real, cu_seqlens_kv=real,
                           cu_seqlens_q_padded=pad, cu_seqlens_kv_padded=pad,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def with_packed_seq_params(batch: MicroBatch) -> MicroBatch:
    """The same micro-batch as TE's THD input: boundaries instead of the block-diagonal mask."""
    return dataclasses.replace(batch, attention_mask=None, packed_seq_params=packed_seq_params(batch))
