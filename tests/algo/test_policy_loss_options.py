"""The option surface of policy_loss: every option is honoured or rejected loudly; normalizer
kinds; the mismatch metrics."""

from __future__ import annotations

import math

import pytest
import torch
from loss_batches import MODE_OPTIONS, random_batch

from gmpo_megatron.algo.policy_loss import LOSS_MODES, local_normalizer, loss_normalizer_kind, policy_loss


def _call(mode, rollout=False, **options):
    batch = random_batch(0)
    return policy_loss(
        mode, batch["log_prob"], batch["old_log_prob"], batch["advantages"], batch["response_mask"],
        rollout_log_prob=batch["rollout_log_prob"] if rollout else None, **options,
    )


def test_unknown_mode_lists_allowed_modes():
    with pytest.raises(ValueError, match=r"unknown policy loss mode 'gmpo2'.*'dapo'.*'gmpo'.*'gspo'"):
        _call("gmpo2")
    with pytest.raises(ValueError, match="allowed"):
        loss_normalizer_kind("ppo")


@pytest.mark.parametrize(
    "mode,options,message",
    [
        ("gmpo", {"clip_eps": 0.2}, r"no option\(s\) \['clip_eps'\]; allowed: .*'clip_eps_high'"),
        ("grpo", {"clip_level": "token"}, r"no option\(s\) \['clip_level'\]"),
        ("grpo", {"max_response_length": 100}, r"no option\(s\) \['max_response_length'\]"),
        ("dapo", {"dual_clip": 1.0}, r"no option\(s\) \['dual_clip'\]"),
        ("gmpo", {"clip_level": "tokens"}, r"clip_level='tokens'; allowed: 'token', 'sequence', 'none'"),
        ("gmpo", {"clip_level": "none", "clip_eps_high": 0.2}, r"\['clip_eps_high'\] have no effect with clip_level='none'"),
        ("gmpo", {"clip_level": "none", "dual_clip": 1.0}, r"\['dual_clip'\] have no effect"),
        ("gmpo", {"dual_clip": -0.5}, "dual_clip must be None or a log-space cap > 0"),
        ("gmpo", {"length_norm": 1}, "length_norm must be True or False"),
        ("gmpo", {"clip_eps_low": -0.1}, "clip_eps_low must be a number >= 0"),
        ("grpo", {"clip_eps_low": 1.5}, "ratio bound 1 - eps negative"),
        ("dr_grpo", {}, "dr_grpo requires max_response_length"),
        ("dr_grpo", {"max_response_length": 0}, "max_response_length must be a positive number"),
        ("gmpo", {"tis_cap": 2.0}, "tis_cap=2.0 given without tis_level"),
        ("gmpo", {"tis_level": "tokens"}, r"unknown tis_level 'tokens'; allowed: \['token', 'sequence', 'geometric'\]"),
        ("gmpo", {"tis_level": "token"}, "use tis_level='geometric'"),
        ("gspo", {"tis_level": "token"}, "use tis_level='geometric'"),
        ("grpo", {"tis_level": "token", "tis_cap": 0}, "tis_cap must be a number > 0"),
    ],
)
def test_bad_options_raise_with_the_fix(mode, options, message):
    with pytest.raises(ValueError, match=message):
        _call(mode, rollout=True, **options)
    with pytest.raises(ValueError, match=message):
        loss_normalizer_kind(mode, **options)


def test_tis_level_without_rollout_log_prob_is_rejected():
    with pytest.raises(ValueError, match="needs rollout_log_prob"):
        _call("gmpo", tis_level="geometric")


def test_dual_clip_none_is_the_off_value_even_with_clip_level_none():
    plain, _ = _call("gmpo", clip_level="none")
    explicit, _ = _call("gmpo", clip_level="none", dual_clip=None)
    assert torch.equal(plain, explicit)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"log_prob": torch.zeros(4)}, r"log_prob must be a \[B, T\] float tensor"),
        ({"old_log_prob": torch.zeros(6, 9)}, r"old_log_prob has shape \(6, 9\), expected \(6, 10\)"),
        ({"response_mask": torch.ones(5, 10)}, r"response_mask has shape \(5, 10\)"),
        ({"advantages": torch.zeros(5)}, r"advantages has shape \(5,\); expected \[B\]=\(6,\)"),
        ({"normalizer": -1}, "normalizer must be a count >= 0"),
        ({"normalizer": torch.ones(2)}, "normalizer must be a number or a 0-dim tensor"),
    ],
)
def test_bad_inputs_raise(kwargs, message):
    batch = dict(random_batch(0))
    batch.pop("rollout_log_prob")
    normalizer = kwargs.pop("normalizer", None)
    batch.update(kwargs)
    with pytest.raises(ValueError, match=message):
        policy_loss("gmpo", **batch, normalizer=normalizer)


def test_normalizer_kinds():
    kinds = {mode: loss_normalizer_kind(mode, **MODE_OPTIONS[mode]) for mode in LOSS_MODES}
    assert kinds == {"gmpo": "sequences", "grpo": "sequences", "dr_grpo": "sequences", "gspo": "sequences", "dapo": "tokens"}


def test_local_normalizer_counts_nonempty_sequences_or_tokens():
    mask = torch.tensor([[0, 1, 1], [0, 0, 0], [1, 0, 0]], dtype=torch.bool)
    assert float(local_normalizer("gmpo", mask)) == 2.0  # the all-masked row is padding
    assert float(local_normalizer("dapo", mask)) == 3.0


def test_float_mask_equals_bool_mask():
    batch = random_batch(1)
    args = (batch["log_prob"], batch["old_log_prob"], batch["advantages"])
    a, _ = policy_loss("gmpo", *args, batch["response_mask"])
    b, _ = policy_loss("gmpo", *args, batch["response_mask"].double())
    assert torch.equal(a, b)


def test_rollout_log_prob_alone_adds_mismatch_metrics_and_leaves_the_loss():
    plain, metrics = _call("gmpo")
    with_rollout, rollout_metrics = _call("gmpo", rollout=True)
    assert torch.equal(plain, with_rollout)
    values = rollout_metrics.to_dict()
    assert "rollout_logp_abs_diff_mean" not in metrics.to_dict() and "tis_weight_mean" not in values

    batch = random_batch(0)
    mask = batch["response_mask"]
    diff = (batch["old_log_prob"] - batch["rollout_log_prob"]).abs()[mask]
    assert values["rollout_logp_abs_diff_mean"] == pytest.approx(float(diff.mean()), rel=1e-12)
    assert values["rollout_logp_abs_diff_max"] == pytest.approx(float(diff.max()), rel=1e-12)


@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
def test_tis_metrics_match_direct_computation(level):
    batch = random_batch(4, batch=40)
    cap = 1.02
    _, metrics = policy_loss(
        "grpo", batch["log_prob"], batch["old_log_prob"], batch["advantages"], batch["response_mask"],
        rollout_log_prob=batch["rollout_log_prob"], tis_level=level, tis_cap=cap,
    )
    mask = batch["response_mask"]
    diffs = [(batch["old_log_prob"] - batch["rollout_log_prob"])[i][mask[i]] for i in range(40) if mask[i].any()]
    if level == "token":
        raw = torch.cat(diffs).exp()
    else:
        raw = torch.stack([d.sum() if level == "sequence" else d.mean() for d in diffs]).exp()
    values = metrics.to_dict()
    assert values["tis_weight_mean"] == pytest.approx(float(raw.clamp(max=cap).mean()), rel=1e-12)
    assert values["tis_capped_frac"] == pytest.approx(float((raw >= cap).double().mean()), rel=1e-12)
    assert 0 < values["tis_capped_frac"] < 1


def test_kl_metric_is_k3_of_kl_old_to_theta():
    """kl = mean over response tokens of exp(d) - 1 - d (d = log_prob - old_log_prob)."""
    batch = random_batch(2)
    _, metrics = policy_loss("gmpo", batch["log_prob"], batch["old_log_prob"], batch["advantages"], batch["response_mask"])
    mask = batch["response_mask"]
    d = (batch["log_prob"] - batch["old_log_prob"])[mask]
    assert metrics.to_dict()["kl"] == pytest.approx(float((torch.exp(d) - 1 - d).mean()), rel=1e-12)
    assert metrics.to_dict()["seq_log_ratio_mean"] == pytest.approx(
        float(
            torch.stack([(batch["log_prob"] - batch["old_log_prob"])[i][mask[i]].mean() for i in range(6) if mask[i].any()]).mean()
        ),
        rel=1e-12,
    )


def test_bf16_inputs_compute_in_float32():
    batch = random_batch(3, dtype=torch.bfloat16)
    lp = batch["log_prob"].clone().requires_grad_(True)
    loss, _ = policy_loss("gmpo", lp, batch["old_log_prob"], batch["advantages"], batch["response_mask"])
    loss.backward()
    assert loss.dtype == torch.float32 and lp.grad.dtype == torch.bfloat16
    assert math.isfinite(float(loss.detach()))
