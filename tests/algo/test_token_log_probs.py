"""token_log_probs against torch.log_softmax(logits / temperature) + gather and the entropy
-(p * log p).sum(), values and gradients of both outputs.

Tolerances: float64 atol = rtol = 1e-10; float32 atol = rtol = 1e-5 (against torch in float32);
bf16 logits: values against the float32 reference on the upcast logits (rtol/atol 1e-5, both
compute in float32), gradients (rounded to bf16) rtol 1e-2, atol 1e-4.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from algo_gloo import run_gloo

from gmpo_megatron.algo.logprobs import token_log_probs

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def _inputs(seed, tokens, vocab, dtype):
    g = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(tokens, vocab, generator=g, dtype=torch.float64)).to(dtype)
    target = torch.randint(0, vocab, (tokens,), generator=g)
    w_lp = torch.randn(tokens, generator=g, dtype=torch.float64)
    w_ent = torch.randn(tokens, generator=g, dtype=torch.float64)
    return logits, target, w_lp, w_ent


def _reference(logits, target, temperature, w_lp, w_ent, with_entropy=True):
    logits = logits.detach().clone().requires_grad_(True)
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    lp = log_p.gather(-1, target[:, None]).squeeze(-1)
    ent = -(log_p.exp() * log_p).sum(-1)
    objective = (lp * w_lp.to(lp.dtype)).sum() + ((ent * w_ent.to(ent.dtype)).sum() if with_entropy else 0)
    objective.backward()
    return lp.detach(), ent.detach(), logits.grad


def _ours(logits, target, temperature, w_lp, w_ent, with_entropy=True, **kwargs):
    logits = logits.detach().clone().requires_grad_(True)
    lp, ent = token_log_probs(logits, target, temperature=temperature, with_entropy=with_entropy, **kwargs)
    objective = (lp * w_lp.to(lp.dtype)).sum() + ((ent * w_ent.to(ent.dtype)).sum() if with_entropy else 0)
    objective.backward()
    return lp.detach(), (ent.detach() if with_entropy else None), logits.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
@pytest.mark.parametrize("chunk_size", [1, 5, 16, 4096])  # 5 does not divide T = 37
def test_values_and_grads_of_both_outputs_match_log_softmax(dtype, temperature, chunk_size):
    logits, target, w_lp, w_ent = _inputs(0, 37, 50, dtype)
    lp, ent, grad = _ours(logits, target, temperature, w_lp, w_ent, chunk_size=chunk_size)
    ref_lp, ref_ent, ref_grad = _reference(logits, target, temperature, w_lp, w_ent)
    assert lp.dtype == dtype and ent.dtype == dtype and grad.dtype == dtype
    torch.testing.assert_close(lp, ref_lp, **TOL[dtype])
    torch.testing.assert_close(ent, ref_ent, **TOL[dtype])
    torch.testing.assert_close(grad, ref_grad, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_each_output_alone_has_the_right_gradient(dtype):
    logits, target, w_lp, w_ent = _inputs(1, 19, 33, dtype)
    zero = torch.zeros_like(w_lp)
    # log_prob only (entropy computed but unused), entropy only, and with_entropy=False
    for w1, w2, with_entropy in ((w_lp, zero, True), (zero, w_ent, True), (w_lp, zero, False)):
        logits_ = logits.clone().requires_grad_(True)
        lp, ent = token_log_probs(logits_, target, chunk_size=7, with_entropy=with_entropy)
        used = (lp * w1.to(dtype)).sum() if w2 is zero else (ent * w2.to(dtype)).sum()
        used.backward()
        _, _, ref_grad = _reference(logits, target, 1.0, w1, w2)
        torch.testing.assert_close(logits_.grad, ref_grad, **TOL[dtype])
        assert (ent is None) == (not with_entropy)


def test_bf16_logits_are_computed_in_float32():
    logits, target, w_lp, w_ent = _inputs(2, 29, 64, torch.bfloat16)
    lp, ent, grad = _ours(logits, target, 0.8, w_lp, w_ent, chunk_size=8)
    ref_lp, ref_ent, ref_grad = _reference(logits.float(), target, 0.8, w_lp, w_ent)
    assert lp.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.float(), ref_grad, rtol=1e-2, atol=1e-4)


def test_leading_dims_are_kept():
    logits, target, w_lp, w_ent = _inputs(3, 24, 20, torch.float64)
    lp, ent = token_log_probs(logits.view(4, 6, 20), target.view(4, 6), chunk_size=5)
    assert lp.shape == ent.shape == (4, 6)
    ref_lp, ref_ent, _ = _reference(logits, target, 1.0, w_lp, w_ent)
    torch.testing.assert_close(lp.reshape(-1), ref_lp, rtol=1e-10, atol=1e-10)


def test_backward_saves_no_full_size_copy_of_the_logits():
    """Everything saved for backward is either the input logits themselves (same storage) or
    O(T): no fp32 [T, V] copy survives the forward (the naive path keeps one)."""
    tokens, vocab = 64, 300
    logits = torch.randn(tokens, vocab, dtype=torch.bfloat16, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp, ent = token_log_probs(logits, torch.randint(0, vocab, (tokens,)), chunk_size=16)
    big = [t for t in saved if t.numel() >= tokens * vocab]
    assert len(big) == 1 and big[0].data_ptr() == logits.data_ptr() and big[0].dtype == torch.bfloat16
    assert sum(t.numel() for t in saved if t.numel() < tokens * vocab) <= 5 * tokens


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"target": torch.tensor([0, 1, 50])}, r"target ids must lie in \[0, 50\)"),
        ({"target": torch.tensor([0, -1, 2])}, "got min -1"),
        ({"target": torch.tensor([0, 1])}, r"target has shape \(2,\); expected \(3,\)"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"chunk_size": 0}, "chunk_size must be a positive int"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    args = {"target": torch.tensor([0, 1, 2]), **kwargs}
    target = args.pop("target")
    with pytest.raises(ValueError, match=message):
        token_log_probs(torch.randn(3, 50), target, **args)


def _tensor_parallel_worker(rank, world_size, dtype, temperature, chunk_size, with_entropy):
    logits, target, w_lp, w_ent = _inputs(4, 23, 48, dtype)  # same data on every rank
    shard = logits.chunk(world_size, dim=-1)[rank].clone().requires_grad_(True)
    lp, ent = token_log_probs(
        shard, target, tp_group=dist.group.WORLD, temperature=temperature, chunk_size=chunk_size, with_entropy=with_entropy
    )
    objective = (lp * w_lp.to(lp.dtype)).sum() + ((ent * w_ent.to(ent.dtype)).sum() if with_entropy else 0)
    objective.backward()
    return {"lp": lp.detach(), "ent": None if ent is None else ent.detach(), "grad": shard.grad}


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize(
    "dtype,temperature,chunk_size,with_entropy",
    [(torch.float64, 0.7, 5, True), (torch.float32, 1.0, 4096, True), (torch.float64, 1.3, 6, False)],
    ids=["fp64-T0.7-chunk5", "fp32-chunk4096", "fp64-no-entropy"],
)
def test_vocab_parallel_gloo_matches_unsharded(world_size, dtype, temperature, chunk_size, with_entropy):
    results = run_gloo(world_size, _tensor_parallel_worker, dtype, temperature, chunk_size, with_entropy)
    logits, target, w_lp, w_ent = _inputs(4, 23, 48, dtype)
    ref_lp, ref_ent, ref_grad = _reference(logits, target, temperature, w_lp, w_ent, with_entropy)
    ref_shards = ref_grad.chunk(world_size, dim=-1)
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["lp"], ref_lp, **TOL[dtype])
        if with_entropy:
            torch.testing.assert_close(result["ent"], ref_ent, **TOL[dtype])
        else:
            assert result["ent"] is None
        torch.testing.assert_close(result["grad"], ref_shards[rank], **TOL[dtype])
