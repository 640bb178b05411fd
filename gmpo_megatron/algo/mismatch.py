"""Rollout/train mismatch: truncated importance sampling (TIS) and its metrics.

The rollout engine (SGLang/vLLM) samples from mu, whose log-probs `rollout_log_prob` differ from
the trainer's recomputation `old_log_prob` (pi_old) because of kernels, precision, MoE routing.
The policy loss is an expectation under pi_old, so each sample gets the importance weight
pi_old / mu, truncated at `cap` to bound the variance (TIS), and detached (it corrects the
sampling distribution; it is not part of the policy gradient):

- ``token``:      w_{i,t} = min(exp(old_t - rollout_t), cap)                        `[B, T]`
- ``sequence``:   w_i     = min(exp(sum_t (old_t - rollout_t)), cap)                `[B]`
- ``geometric``:  w_i     = min(exp(mean_t (old_t - rollout_t)), cap)               `[B]`
  (the geometric mean of the token weights; the level that matches GMPO's geometric-mean ratio)

Computed in log space, min(log w, log cap), so long sequences never overflow.
"""

from __future__ import annotations

import math

import torch

from gmpo_megatron.algo.metrics import Metrics, add_masked_stats

__all__ = ["TIS_LEVELS", "truncated_is_weights", "add_mismatch_metrics"]

TIS_LEVELS = ("token", "sequence", "geometric")


def truncated_is_weights(
    old_log_prob: torch.Tensor,
    rollout_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    level: str,
    cap: float,
) -> torch.Tensor:
    """Detached TIS weights: `[B, T]` for level "token" (1 outside the mask), else `[B]`.

    old_log_prob, rollout_log_prob, response_mask: `[B, T]`. Values outside the mask are ignored
    (may be garbage). A sequence without response tokens gets weight 1 (it contributes nothing).
    """
    if level not in TIS_LEVELS:
        raise ValueError(f"unknown tis_level {level!r}; allowed: {list(TIS_LEVELS)}")
    if not cap > 0:
        raise ValueError(f"tis_cap must be > 0 (a cap on pi_old/mu, e.g. 2.0), got {cap}")
    with torch.no_grad():
        mask = response_mask.bool()
        log_w = torch.where(mask, old_log_prob.detach() - rollout_log_prob.detach(), 0.0)
        if level == "sequence":
            log_w = log_w.sum(-1)
        elif level == "geometric":
            log_w = log_w.sum(-1) / mask.sum(-1).clamp(min=1)
        return log_w.clamp(max=math.log(cap)).exp()


def add_mismatch_metrics(
    metrics: Metrics,
    old_log_prob: torch.Tensor,
    rollout_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    tis_weights: torch.Tensor | None = None,
    tis_cap: float | None = None,
) -> None:
    """Add `rollout_logp_abs_diff_mean|_max` = |old_log_prob - rollout_log_prob| over response
    tokens, and with TIS weights `tis_weight_mean` and `tis_capped_frac` (per token for token
    level, per sequence with response tokens otherwise)."""
    mask = response_mask.bool()
    diff = torch.where(mask, old_log_prob.detach() - rollout_log_prob.detach(), 0.0).abs()
    add_masked_stats(metrics, "rollout_logp_abs_diff", diff, mask, stats=("mean", "max"))
    if tis_weights is not None:
        unit_mask = mask if tis_weights.dim() == 2 else mask.any(-1)
        add_masked_stats(metrics, "tis_weight", tis_weights, unit_mask, stats=("mean",))
        # exp(log cap) may differ from cap in the last bit: "at the cap" within 1e-6 relative
        capped = (tis_weights >= tis_cap * (1 - 1e-6)).to(torch.float64)
        metrics.add_mean("tis_capped_frac", torch.where(unit_mask, capped, 0.0).sum(), unit_mask.sum())
