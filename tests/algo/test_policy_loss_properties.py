"""Property tests (hypothesis): the loss is a function of the set of sequences and of the
response tokens only."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from loss_batches import MODE_OPTIONS, MODE_SCALE, random_batch

from gmpo_megatron.algo.policy_loss import policy_loss

CASES = [
    ("gmpo", {}),
    ("gmpo", {"clip_level": "sequence"}),
    ("gmpo", {"clip_level": "none"}),
    ("gmpo", {"tis_level": "geometric"}),
    ("grpo", {"tis_level": "token"}),
    ("dapo", {}),
    ("dr_grpo", MODE_OPTIONS["dr_grpo"]),
    ("gspo", {"tis_level": "sequence"}),
]

cases = st.sampled_from(CASES)
seeds = st.integers(0, 2**31 - 1)


def _run(mode, options, batch):
    lp = batch["log_prob"].clone().requires_grad_(True)
    loss, metrics = policy_loss(
        mode, lp, batch["old_log_prob"], batch["advantages"], batch["response_mask"],
        rollout_log_prob=batch["rollout_log_prob"], **options,
    )
    (grad,) = torch.autograd.grad(loss, lp)
    return loss, grad, metrics.to_dict()


def _batch(seed, mode, batch_size, length, token_advantages):
    return random_batch(seed, batch=batch_size, length=length, scale=MODE_SCALE[mode], token_advantages=token_advantages)


@settings(max_examples=40, deadline=None)
@given(case=cases, seed=seeds, batch_size=st.integers(3, 9), length=st.integers(2, 9), token_adv=st.booleans())
def test_permuting_sequences_permutes_grads_and_keeps_loss(case, seed, batch_size, length, token_adv):
    mode, options = case
    batch = _batch(seed, mode, batch_size, length, token_adv)
    perm = torch.randperm(batch_size, generator=torch.Generator().manual_seed(seed))
    loss, grad, metrics = _run(mode, options, batch)
    p_loss, p_grad, p_metrics = _run(mode, options, {k: v[perm] for k, v in batch.items()})
    torch.testing.assert_close(p_loss, loss, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(p_grad, grad[perm], rtol=1e-12, atol=1e-15)
    assert p_metrics.keys() == metrics.keys()
    for name, value in metrics.items():
        assert math.isclose(p_metrics[name], value, rel_tol=1e-12, abs_tol=1e-15) or (
            math.isnan(value) and math.isnan(p_metrics[name])
        ), name


garbage_values = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, 1e30, -1e30]),
    st.floats(allow_nan=False, allow_infinity=False, width=64),
)


@settings(max_examples=40, deadline=None)
@given(
    case=cases,
    seed=seeds,
    batch_size=st.integers(3, 9),
    length=st.integers(2, 9),
    token_adv=st.booleans(),
    fills=st.lists(garbage_values, min_size=4, max_size=4),
)
def test_values_outside_the_response_mask_change_nothing(case, seed, batch_size, length, token_adv, fills):
    """Any value (nan, +-inf, huge, arbitrary finite) at masked positions of log_prob,
    old_log_prob, rollout_log_prob and [B, T] advantages leaves loss, gradient and metrics
    bit-identical, and the gradient at masked positions is exactly 0."""
    mode, options = case
    batch = _batch(seed, mode, batch_size, length, token_adv)
    mask = batch["response_mask"]
    loss, grad, metrics = _run(mode, options, batch)

    names = ["log_prob", "old_log_prob", "rollout_log_prob", "advantages"]
    dirty = dict(batch)
    for name, value in zip(names, fills):
        if batch[name].shape == mask.shape:
            dirty[name] = torch.where(mask, batch[name], torch.tensor(value, dtype=torch.float64))
    d_loss, d_grad, d_metrics = _run(mode, options, dirty)
    assert torch.equal(d_loss, loss)
    assert torch.equal(d_grad, grad)
    assert torch.all(d_grad[~mask] == 0)
    assert d_metrics.keys() == metrics.keys()
    for name, value in metrics.items():
        assert d_metrics[name] == value or (math.isnan(value) and math.isnan(d_metrics[name])), name
