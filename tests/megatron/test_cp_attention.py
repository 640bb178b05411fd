"""The local spec's context-parallel attention (``megatron/cp_attention.py``) equals plain full
causal attention, forward and gradients, in float64: over 2 gloo CP ranks with Megatron's 2*CP
layout, odd head dims, GQA, a padded row whose sequence is shorter than the row, and a packed row
(block-diagonal causal mask, tail padding)."""

from __future__ import annotations

import datetime
import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gmpo_megatron.algo.context_parallel import cp_chunk_positions

# (heads, query groups, head dim, row length, rows, sequence lengths in a row (None: padded row))
CASES = {
    "gqa3_dim7_padded": (6, 2, 7, 12, 2, [9]),      # 9 real tokens in a row of 12 (2*CP = 4)
    "mqa_dim5_packed": (4, 1, 5, 16, 1, [5, 7, 2]),  # 14 packed tokens + 2 tail padding
    "mha_dim3_full": (3, 3, 3, 8, 3, [8]),
}
ATOL = 1e-12


def _reference(q, k, v, lengths, heads, groups):
    """Plain attention per sequence, float64: softmax(q k^T / sqrt(d) + causal) v. q [S, b, n, d],
    k / v [S, b, g, d]; the positions outside every sequence get 0."""
    out = torch.zeros(q.shape[0], q.shape[1], heads * q.shape[-1], dtype=q.dtype)
    d = q.shape[-1]
    for row in range(q.shape[1]):
        start = 0
        for n in lengths:
            qs, ks, vs = (t[start:start + n, row] for t in (q, k, v))  # [n, heads or groups, d]
            ks = ks.repeat_interleave(heads // groups, dim=1)
            vs = vs.repeat_interleave(heads // groups, dim=1)
            scores = torch.einsum("ind,jnd->nij", qs, ks) / math.sqrt(d)
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            out[start:start + n, row] = torch.einsum("nij,jnd->ind", scores.softmax(-1), vs).reshape(n, -1)
            start += n
    return out


def _inputs(case: str):
    heads, groups, d, seq, rows, lengths = CASES[case]
    g = torch.Generator().manual_seed(sum(map(ord, case)))
    q = torch.randn(seq, rows, heads, d, dtype=torch.float64, generator=g)
    k = torch.randn(seq, rows, groups, d, dtype=torch.float64, generator=g)
    v = torch.randn(seq, rows, groups, d, dtype=torch.float64, generator=g)
    upstream = torch.randn(seq, rows, heads * d, dtype=torch.float64, generator=g)
    real = torch.zeros(seq, dtype=torch.bool)
    real[:sum(lengths)] = True
    upstream[~real] = 0.0  # the loss reads real tokens only
    return q, k, v, upstream, lengths


def _packed_mask(seq: int, lengths: list[int]) -> torch.Tensor:
    """[1, 1, S, S], True = masked: causal within each sequence, every pad token on its own."""
    segment = torch.arange(seq) + len(lengths)  # pad tokens: unique segments
    start = 0
    for i, n in enumerate(lengths):
        segment[start:start + n] = i
        start += n
    visible = torch.ones(seq, seq, dtype=torch.bool).tril() & (segment[:, None] == segment[None, :])
    return (~visible)[None, None]


def _attention(heads, groups, d, cp):
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    from gmpo_megatron.megatron.cp_attention import ContextParallelDotProductAttention

    config = TransformerConfig(num_layers=1, hidden_size=heads * d, num_attention_heads=heads,
                               num_query_groups=groups, kv_channels=d, context_parallel_size=cp,
                               attention_dropout=0.0, hidden_dropout=0.0, params_dtype=torch.float64,
                               use_cpu_initialization=True)
    return ContextParallelDotProductAttention(config, 1, AttnMaskType.causal, "self")


def _worker(rank, world_size, store, case, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        from gmpo_megatron.megatron.parallel import init_distributed

        init_distributed(cp=world_size)
        heads, groups, d, seq, rows, lengths = CASES[case]
        q, k, v, upstream, lengths = _inputs(case)
        positions = cp_chunk_positions(seq, world_size, rank)
        local = [t[positions].clone().requires_grad_(True) for t in (q, k, v)]
        mask = None if len(lengths) == 1 else _packed_mask(seq, lengths).index_select(2, positions)
        out = _attention(heads, groups, d, world_size)(*local, mask)
        (out * upstream[positions]).sum().backward()
        torch.save({"positions": positions, "out": out.detach(), "grads": [t.grad for t in local]},
                   os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def cp2_results():
    results = {}
    with tempfile.TemporaryDirectory() as out_dir:
        for case in CASES:
            os.makedirs(os.path.join(out_dir, case))
            mp.spawn(_worker, args=(2, os.path.join(out_dir, case, "store"), case,
                                    os.path.join(out_dir, case)), nprocs=2, join=True)
            results[case] = [torch.load(os.path.join(out_dir, case, f"{r}.pt")) for r in range(2)]
    return results


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_cp2_attention_equals_full_attention_forward_and_gradients(case, cp2_results):
    heads, groups, d, seq, rows, lengths = CASES[case]
    q, k, v, upstream, lengths = _inputs(case)
    full = [t.clone().requires_grad_(True) for t in (q, k, v)]
    expected = _reference(*full, lengths, heads, groups)
    (expected * upstream).sum().backward()
    real = torch.arange(seq) < sum(lengths)
    covered = torch.zeros(seq, dtype=torch.bool)
    for result in cp2_results[case]:
        positions = result["positions"]
        covered[positions] = True
        keep = real[positions]  # padding queries attend to padding: not compared
        assert torch.allclose(result["out"][keep], expected[positions][keep], rtol=0, atol=ATOL)
        for grad, reference in zip(result["grads"], (t.grad for t in full)):
            # each rank holds the whole gradient of its own q, k, v (k / v: summed over the
            # queries of both ranks by the all-gather's reduce-scatter)
            assert torch.allclose(grad[keep], reference[positions][keep], rtol=0, atol=ATOL)
    assert covered.all()


def test_one_rank_equals_megatron_dot_product_attention(megatron_single_process):
    """At CP=1 the module is Megatron's DotProductAttention (causal and packed-mask inputs)."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    for case in ("gqa3_dim7_padded", "mqa_dim5_packed"):
        heads, groups, d, seq, rows, lengths = CASES[case]
        q, k, v, _, lengths = _inputs(case)
        mask = None if len(lengths) == 1 else _packed_mask(seq, lengths).expand(rows, 1, seq, seq)
        config = TransformerConfig(num_layers=1, hidden_size=heads * d, num_attention_heads=heads,
                                   num_query_groups=groups, kv_channels=d, attention_dropout=0.0,
                                   hidden_dropout=0.0, params_dtype=torch.float64,
                                   use_cpu_initialization=True)
        theirs = DotProductAttention(config, 1, AttnMaskType.causal, "self")(q, k, v, mask)
        ours = _attention(heads, groups, d, 1)(q, k, v, mask)
        assert torch.allclose(ours, theirs, rtol=0, atol=ATOL)


def test_unsupported_options_are_refused_by_name(megatron_single_process):
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    from gmpo_megatron.megatron.cp_attention import ContextParallelDotProductAttention

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, kv_channels=4,
                               attention_dropout=0.1, use_cpu_initialization=True)
    with pytest.raises(ValueError) as refused:
        ContextParallelDotProductAttention(config, 1, AttnMaskType.causal, "self", cp_comm_type="p2p")
    assert "cp_comm_type='p2p'" in str(refused.value) and "attention_dropout=0.1" in str(refused.value)
