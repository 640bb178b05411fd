"""GMPO's defining properties from the paper: the Eq. 6 gradient, zero gradient for clipped
tokens, the bound by GRPO's objective (AM-GM), and numerics at extreme log-ratios."""

from __future__ import annotations

import pytest
import torch
from loss_batches import MODE_OPTIONS, random_batch

from gmpo_megatron.algo.policy_loss import policy_loss


def _loss_and_grad(mode, batch, **options):
    lp = batch["log_prob"].clone().requires_grad_(True)
    loss, metrics = policy_loss(mode, lp, batch["old_log_prob"], batch["advantages"], batch["response_mask"], **options)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss, grad, metrics.to_dict()


@pytest.mark.parametrize("seed", range(4))
def test_gmpo_grad_matches_eq6(seed):
    """No clip active: dL/dlog_prob_{i,t} = -(1/G) A_i r_i / |o_i| on response tokens, 0 elsewhere,
    with r_i = exp(mean_t d_t) (float64, rtol 1e-12)."""
    batch = random_batch(seed, batch=8, scale=0.1)  # |d| <= ~0.35 < 0.4: nothing clipped
    loss, grad, metrics = _loss_and_grad("gmpo", batch)
    assert metrics["clipfrac"] == 0.0

    mask, A = batch["response_mask"], batch["advantages"]
    d = torch.where(mask, batch["log_prob"] - batch["old_log_prob"], 0.0)
    lengths = mask.sum(-1)
    G = int((lengths > 0).sum())
    r = torch.exp(d.sum(-1) / lengths.clamp(min=1))
    expected = torch.where(mask, (-A * r / lengths.clamp(min=1) / G)[:, None], 0.0)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(loss, (-A * r)[lengths > 0].sum() / G, rtol=1e-12, atol=0)


@pytest.mark.parametrize("seed", range(4))
def test_gmpo_clipped_tokens_get_exactly_zero_grad(seed):
    """Token clip active: a token beyond the bound on the side of sign(A) gets gradient exactly 0;
    every other response token of sequence i gets -(1/G) A_i r_i / |o_i| with r_i built from the
    clipped log-ratios (Algorithm 1)."""
    batch = random_batch(seed, batch=8, scale=0.6)
    eps_low, eps_high = 0.3, 0.4
    loss, grad, metrics = _loss_and_grad("gmpo", batch, clip_eps_low=eps_low, clip_eps_high=eps_high)

    mask, A = batch["response_mask"], batch["advantages"]
    d = torch.where(mask, batch["log_prob"] - batch["old_log_prob"], 0.0)
    clipped = mask & (((A > 0)[:, None] & (d > eps_high)) | ((A < 0)[:, None] & (d < -eps_low)))
    assert clipped.any() and (mask & ~clipped & (A != 0)[:, None]).any()
    assert torch.all(grad[clipped] == 0)

    d_tilde = torch.where((A > 0)[:, None], d.clamp(max=eps_high), d.clamp(min=-eps_low))
    lengths = mask.sum(-1)
    G = int((lengths > 0).sum())
    r = torch.exp(d_tilde.sum(-1) / lengths.clamp(min=1))
    expected = torch.where(mask & ~clipped, (-A * r / lengths.clamp(min=1) / G)[:, None], 0.0)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=0)
    assert metrics["clipfrac"] == pytest.approx(float(clipped.sum() / mask.sum()))


@pytest.mark.parametrize("seed", range(5))
def test_gmpo_objective_bounded_by_grpo_objective(seed):
    """Paper Sec. 3: |J_GMPO*| <= |J_GRPO*| without clipping. Tested precisely as:
    (a) per sequence, |-A_i exp(mean_t d_t)| <= |-A_i mean_t exp(d_t)| (AM-GM), each side computed
        by policy_loss on that one sequence (gmpo clip_level="none"; grpo with bounds that never
        bind: eps_low=1, eps_high=1e9), with equality for length-1 responses;
    (b) for the whole batch when all advantages share one sign (with mixed signs the sums can
        cancel differently and the batch-level inequality does not hold in general)."""
    batch = random_batch(seed, batch=8, scale=0.8)
    no_clip = {"clip_eps_low": 1.0, "clip_eps_high": 1e9}
    mask = batch["response_mask"]
    for i in range(mask.shape[0]):
        row = {k: v[i : i + 1] for k, v in batch.items()}
        gmpo, _, _ = _loss_and_grad("gmpo", row, clip_level="none")
        grpo, _, _ = _loss_and_grad("grpo", row, **no_clip)
        assert abs(gmpo) <= abs(grpo) * (1 + 1e-12)
        if mask[i].sum() == 1:
            torch.testing.assert_close(gmpo, grpo, rtol=1e-12, atol=0)

    for sign in (1.0, -1.0):
        same_sign = dict(batch, advantages=sign * batch["advantages"].abs())
        gmpo, _, _ = _loss_and_grad("gmpo", same_sign, clip_level="none")
        grpo, _, _ = _loss_and_grad("grpo", same_sign, **no_clip)
        assert abs(gmpo) < abs(grpo)


@pytest.mark.parametrize("mode", sorted(MODE_OPTIONS))
def test_first_step_ratios_are_one_and_kl_zero(mode):
    """On-policy first update (log_prob == old_log_prob): every ratio is 1, so the loss is
    -sum_i A_i / G (GRPO family: token-weighted per the mode's aggregation), clipfrac and kl 0."""
    batch = random_batch(7, batch=8)
    batch["log_prob"] = batch["old_log_prob"].clone()
    loss, _, metrics = _loss_and_grad(mode, batch, **MODE_OPTIONS[mode])
    mask, A = batch["response_mask"], batch["advantages"]
    lengths, G = mask.sum(-1), int(mask.any(-1).sum())
    expected = {
        "gmpo": -A[lengths > 0].sum() / G,
        "gspo": -A[lengths > 0].sum() / G,
        "grpo": -A[lengths > 0].sum() / G,
        "dapo": -(A * lengths).sum() / lengths.sum(),
        "dr_grpo": -(A * lengths).sum() / 16 / G,
    }[mode]
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-15)
    assert metrics["kl"] == 0.0 and metrics["clipfrac"] == 0.0
    assert metrics["log_ratio_min"] == 0.0 and metrics["log_ratio_max"] == 0.0


def test_gmpo_no_clip_extreme_log_ratio_is_finite_in_float32():
    """clip_level="none" with |d| = 50 on every token: exp(+-50) is representable in float32, so
    loss and gradient must be finite and agree with float64 (rtol 1e-5)."""
    batch = random_batch(8, batch=8)
    mask = batch["response_mask"]
    sign = torch.where(torch.arange(mask.shape[0]) % 2 == 0, 1.0, -1.0).double()[:, None]
    batch["log_prob"] = torch.where(mask, batch["old_log_prob"] + 50 * sign, batch["log_prob"])
    loss64, grad64, _ = _loss_and_grad("gmpo", batch, clip_level="none")
    batch32 = {k: (v.float() if v.is_floating_point() else v) for k, v in batch.items()}
    loss32, grad32, _ = _loss_and_grad("gmpo", batch32, clip_level="none")
    assert torch.isfinite(loss32) and torch.isfinite(grad32).all()
    torch.testing.assert_close(loss32.double(), loss64, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad32.double(), grad64, rtol=1e-5, atol=1e-30)


@pytest.mark.parametrize(
    "mode,options",
    [("gmpo", {"clip_level": "none"}), ("gmpo", {"length_norm": False, "clip_level": "none"}), ("gspo", {})],
)
def test_zero_advantage_rows_stay_nan_free_when_their_ratio_overflows(mode, options):
    """A = 0 (and padding) rows contribute exactly 0 and a zero gradient even when exp of their
    log-ratio overflows float32 (0 * inf would be NaN)."""
    batch = random_batch(9, batch=6, dtype=torch.float32)
    A, mask = batch["advantages"], batch["response_mask"]
    zero_row = int(torch.nonzero(A == 0)[0])
    batch["log_prob"][zero_row] = batch["old_log_prob"][zero_row] + 500.0
    loss, grad, _ = _loss_and_grad(mode, batch, **options)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert torch.all(grad[zero_row] == 0)
    assert mask[zero_row].any()
