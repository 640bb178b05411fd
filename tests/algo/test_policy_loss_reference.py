"""Every policy-loss mode against the independent float64 loop reference (reference_losses.py).

Loss and autograd gradient w.r.t. log_prob, on fresh random batches (seeds 0..2) that contain
clipped units on both sides, A = 0, a length-1 response, a padding row and garbage at masked
positions; plus log-ratios of +-50. Tolerance (float64): rtol 1e-9, atol 1e-12 — the two
computations differ only in summation order and formulation (min/clamp vs branches).
"""

from __future__ import annotations

import math

import pytest
import torch
from loss_batches import MODE_OPTIONS, MODE_SCALE, random_batch
from reference_losses import reference_loss

from gmpo_megatron.algo.policy_loss import policy_loss

TOL = dict(rtol=1e-9, atol=1e-12)

CASES = [
    ("gmpo", {}),
    ("gmpo", {"clip_eps_low": 0.2, "clip_eps_high": 0.3}),
    ("gmpo", {"clip_level": "sequence"}),
    ("gmpo", {"clip_level": "none"}),
    ("gmpo", {"length_norm": False}),
    ("gmpo", {"clip_level": "sequence", "length_norm": False}),
    ("gmpo", {"dual_clip": 0.6}),
    ("gmpo", {"clip_level": "sequence", "dual_clip": 0.5}),
    ("grpo", {}),
    ("grpo", {"clip_eps_low": 0.1, "clip_eps_high": 0.28}),
    ("dapo", {}),
    ("dr_grpo", {"max_response_length": 16}),
    ("gspo", {}),
    ("gspo", {"clip_eps_low": 1e-3, "clip_eps_high": 2e-3}),
    # truncated importance sampling towards the rollout policy
    ("gmpo", {"tis_level": "geometric", "tis_cap": 1.02}),
    ("gmpo", {"tis_level": "sequence", "tis_cap": 1.05}),
    ("grpo", {"tis_level": "token", "tis_cap": 1.03}),
    ("dapo", {"tis_level": "sequence"}),
    ("dr_grpo", {"max_response_length": 16, "tis_level": "geometric", "tis_cap": 1.01}),
    ("gspo", {"tis_level": "geometric", "tis_cap": 1.01}),
]


def _ids(case):
    mode, options = case
    return mode + "".join(f"-{k}={v}" for k, v in options.items())


def _compare(mode, options, batch, normalizer=None):
    lp = batch["log_prob"].clone().requires_grad_(True)
    loss, metrics = policy_loss(
        mode, lp, batch["old_log_prob"], batch["advantages"], batch["response_mask"],
        rollout_log_prob=batch["rollout_log_prob"], normalizer=normalizer, **options,
    )
    (grad,) = torch.autograd.grad(loss, lp)

    ref_lp = batch["log_prob"].clone().requires_grad_(True)
    ref, counts = reference_loss(
        mode, ref_lp, batch["old_log_prob"], batch["advantages"], batch["response_mask"],
        rollout_log_prob=batch["rollout_log_prob"], normalizer=normalizer, **dict(options),
    )
    (ref_grad,) = torch.autograd.grad(ref, ref_lp, allow_unused=True)
    ref_grad = torch.zeros_like(ref_lp) if ref_grad is None else ref_grad

    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, ref.detach(), **TOL)
    torch.testing.assert_close(grad, ref_grad, **TOL)
    return metrics.to_dict(), counts


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("token_advantages", [False, True], ids=["adv[B]", "adv[B,T]"])
def test_loss_and_grad_match_float64_reference(case, seed, token_advantages):
    mode, options = case
    batch = random_batch(seed, scale=MODE_SCALE[mode], token_advantages=token_advantages)
    metrics, counts = _compare(mode, options, batch)
    # the clip-fraction metrics count exactly the units the reference clipped, on the active side
    assert counts["units"] > 0
    assert metrics["clipfrac_low"] == pytest.approx(counts["low"] / counts["units"])
    assert metrics["clipfrac_high"] == pytest.approx(counts["high"] / counts["units"])
    assert metrics["clipfrac"] == pytest.approx((counts["low"] + counts["high"]) / counts["units"])
    if "dual_clip" in options:
        assert metrics["clipfrac_dual"] == pytest.approx(counts["dual"] / counts["units"])


@pytest.mark.parametrize("mode", sorted(MODE_OPTIONS))
def test_reference_batches_clip_on_both_sides(mode):
    """Guard for the test above: its random batches clip on both sides, and not everything."""
    low = high = units = 0
    for seed in range(3):
        batch = random_batch(seed, scale=MODE_SCALE[mode])
        _, counts = reference_loss(mode, batch["log_prob"], batch["old_log_prob"], batch["advantages"],
                                   batch["response_mask"], **dict(MODE_OPTIONS[mode]))
        low, high, units = low + counts["low"], high + counts["high"], units + counts["units"]
    assert low > 0 and high > 0 and low + high < units


@pytest.mark.parametrize("case", CASES[:14], ids=_ids)
def test_extreme_log_ratios_match_reference(case):
    """Log-ratios of +-50 on ~30% of response tokens: finite, and equal to the reference."""
    mode, options = case
    for seed in (3, 4):
        _compare(mode, options, random_batch(seed, scale=MODE_SCALE[mode], extreme=True))


@pytest.mark.parametrize("mode", sorted(MODE_OPTIONS))
def test_explicit_global_normalizer_replaces_local_count(mode):
    batch = random_batch(5, scale=MODE_SCALE[mode])
    _compare(mode, MODE_OPTIONS[mode], batch, normalizer=37)
    _compare(mode, MODE_OPTIONS[mode], batch, normalizer=torch.tensor(37.0))


@pytest.mark.parametrize("mode", sorted(MODE_OPTIONS))
def test_all_masked_batch_gives_zero_loss_and_zero_grad(mode):
    batch = random_batch(6)
    lp = batch["log_prob"].clone().requires_grad_(True)
    mask = torch.zeros_like(batch["response_mask"])
    loss, metrics = policy_loss(mode, lp, batch["old_log_prob"], batch["advantages"], mask, **MODE_OPTIONS[mode])
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(lp.grad, torch.zeros_like(lp))
    values = metrics.to_dict()
    assert math.isnan(values["log_ratio_mean"]) and math.isnan(values["log_ratio_max"])


@pytest.mark.parametrize("seed", range(3))
def test_log_ratio_percentiles_and_tail_fractions_match_float64_formula(seed):
    """log_ratio_p*, seq_log_ratio_p* (within the histogram's 0.5% / 1e-9 resolution) and
    log_ratio_abs_gt_* (exact) against d_t and sum_t d_t / |o_i| computed here in float64."""
    from gmpo_megatron.algo.metrics import PERCENTILES, LogHistogram, percentile_key
    from gmpo_megatron.algo.policy_loss import LOG_RATIO_THRESHOLDS

    batch = random_batch(300 + seed, batch=64, length=24, scale=0.6)
    _, metrics = policy_loss("gmpo", **batch)
    out = metrics.to_dict()
    mask = batch["response_mask"]
    d = batch["log_prob"].double() - batch["old_log_prob"].double()
    tokens = d[mask]
    rows = mask.any(-1)
    seq = torch.where(mask, d, 0.0).sum(-1)[rows] / mask.sum(-1)[rows]

    def nearest_rank(values, pct):
        ordered = values.sort().values
        return float(ordered[max(1, math.ceil(pct / 100 * ordered.numel())) - 1])

    for name, values in (("log_ratio", tokens), ("seq_log_ratio", seq)):
        for pct in PERCENTILES:
            exact, got = nearest_rank(values, pct), out[percentile_key(name, pct)]
            assert abs(got - exact) <= LogHistogram.REL_TOL * (1 + 1e-9) * abs(exact) + LogHistogram.MIN_ABS
    for threshold in LOG_RATIO_THRESHOLDS:
        expected = float((tokens.abs() > threshold).double().mean())
        assert out[f"log_ratio_abs_gt_{threshold:g}"] == pytest.approx(expected, rel=1e-12)
    assert 0 < out["log_ratio_abs_gt_1"] < out["log_ratio_abs_gt_0.1"] < 1  # the batch covers the tails
