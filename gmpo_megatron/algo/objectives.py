"""The policy objectives, one short function per paper, each returning the SUM of its
per-sequence (or per-token) losses and the clip statistics; `policy_loss.py` validates options,
prepares the inputs and divides by the global normalizer.

Inputs are already clean: `log_ratio` `[B, T]` is d_t = log pi_theta - log pi_old and exactly 0
outside the response `mask` `[B, T]` (bool); advantages are 0 on padding rows; `weight` is the
detached truncated-IS weight (mismatch.py), or 1.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "ClipStats",
    "gmpo_objective",
    "gspo_objective",
    "grpo_objective",
    "dapo_objective",
    "dr_grpo_objective",
]


class ClipStats(NamedTuple):
    """Boolean masks of clipped units (tokens `[B, T]` or sequences `[B]`) on the active side."""

    low: torch.Tensor  # A < 0 and the ratio is below the lower bound
    high: torch.Tensor  # A > 0 and the ratio is above the upper bound
    units: torch.Tensor  # the units counted (response tokens or non-empty sequences)
    dual: torch.Tensor | None = None  # A < 0 and the ratio is above the dual-clip cap


def _one_sided_clip(
    x: torch.Tensor, sign: torch.Tensor, low: float, high: float, dual: float | None = None
) -> torch.Tensor:
    """PPO's pessimistic clip, in log space: s * min(s*x, s*clamp(x, low, high)).

    A > 0 (s = 1): min(x, high); A < 0 (s = -1): max(x, low), and min(., dual) with a dual clip;
    A = 0: 0. The bound that is not active for the sign never applies, so a clipped unit gets
    exactly zero gradient.
    """
    clipped = sign * torch.minimum(sign * x, sign * x.clamp(low, high))
    if dual is not None:
        clipped = torch.where(sign < 0, clipped.clamp(max=dual), clipped)
    return clipped


@torch.no_grad()
def _log_space_clip_stats(x, sign, units, low, high, dual) -> ClipStats:
    """Which units of `x` (token or summed log-ratios) lie beyond the bound active for sign(A)."""
    return ClipStats(
        low=units & (sign < 0) & (x < low),
        high=units & (sign > 0) & (x > high),
        units=units,
        dual=None if dual is None else units & (sign < 0) & (x > dual),
    )


# ---------------------------------------------------------------------------------------------
# GMPO and GSPO: one ratio per sequence
# ---------------------------------------------------------------------------------------------


def gmpo_objective(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor | float,
    *,
    clip_eps_low: float,
    clip_eps_high: float,
    clip_level: str,
    length_norm: bool,
    dual_clip: float | None,
) -> tuple[torch.Tensor, ClipStats]:
    """GMPO, paper Eq. 4 / Algorithm 1. Returns (sum_i loss_i, clip stats).

        d~_t = s_i * min(s_i d_t, s_i clamp(d_t, -eps_low, eps_high))        clip_level="token"
        r_i  = exp( sum_{t in o_i} d~_t / |o_i| )      geometric mean of the clipped token ratios
        L    = (1/G) sum_i -A_i r_i w_i

    clip_level="sequence" (Table 4 row 3): clip the summed log-ratio instead,
        r_i = exp( s_i min(s_i S_i, s_i clamp(S_i, -eps_low, eps_high)) / |o_i| ),  S_i = sum_t d_t
    clip_level="none" (row 2): r_i = exp(S_i / |o_i|).  length_norm=False (row 4): no 1/|o_i|.

    dual_clip=c (log space, off by default): for A_i < 0 the clipped log-ratio is also capped
    above at c, i.e. d~_t = min(max(d_t, -eps_low), c) (token level; at sequence level the summed
    log-ratio is capped at c). It is PPO's dual clip with ratio cap e^c: a negative-advantage
    sequence whose ratio exploded stops pushing. Capped units get zero gradient.

    log_ratio `[B, T]` (0 outside mask), advantages `[B]`, mask `[B, T]` bool, weight `[B]` or 1.
    """
    sign = advantages.sign()
    lengths = mask.sum(-1)
    if clip_level == "token":
        # log_ratio is 0 outside the mask and the clip maps 0 to 0: a plain sum is the masked sum
        seq_log_ratio = _one_sided_clip(log_ratio, sign[:, None], -clip_eps_low, clip_eps_high, dual_clip).sum(-1)
    elif clip_level == "sequence":
        seq_log_ratio = _one_sided_clip(log_ratio.sum(-1), sign, -clip_eps_low, clip_eps_high, dual_clip)
    else:
        seq_log_ratio = log_ratio.sum(-1)
    if length_norm:
        seq_log_ratio = seq_log_ratio / lengths.clamp(min=1)
    # Rows that contribute nothing (padding, A = 0) get exponent 0: their loss is exactly 0 and no
    # inf*0 = NaN can reach the gradient even when their unclipped log-ratio would overflow exp.
    live = (lengths > 0) & (sign != 0)
    ratio = torch.exp(torch.where(live, seq_log_ratio, 0.0))
    loss_sum = (-advantages * ratio * weight).sum()

    bounds = (-clip_eps_low, clip_eps_high, dual_clip)
    if clip_level == "token":
        stats = _log_space_clip_stats(log_ratio, sign[:, None], mask, *bounds)
    elif clip_level == "sequence":
        stats = _log_space_clip_stats(log_ratio.sum(-1), sign, lengths > 0, *bounds)
    else:
        never = torch.zeros_like(mask)
        stats = ClipStats(never, never, mask)
    return loss_sum, stats


def gspo_objective(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor | float,
    *,
    clip_eps_low: float,
    clip_eps_high: float,
) -> tuple[torch.Tensor, ClipStats]:
    """GSPO (arXiv 2507.18071), sequence-level ratio and clip, gradient through the ratio:

        s_i = exp( sum_{t in o_i} d_t / |o_i| )
        L   = (1/G) sum_i -min( s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i ) w_i

    log_ratio `[B, T]` (0 outside mask), advantages `[B]`, mask `[B, T]`, weight `[B]` or 1.
    """
    lengths = mask.sum(-1)
    live = (lengths > 0) & (advantages != 0)
    seq_log_ratio = log_ratio.sum(-1) / lengths.clamp(min=1)
    ratio = torch.exp(torch.where(live, seq_log_ratio, 0.0))  # see gmpo_objective: no inf*0
    objective = torch.minimum(ratio * advantages, ratio.clamp(1 - clip_eps_low, 1 + clip_eps_high) * advantages)
    loss_sum = (-objective * weight).sum()
    with torch.no_grad():
        units = lengths > 0
        stats = ClipStats(
            low=units & (advantages < 0) & (ratio < 1 - clip_eps_low),
            high=units & (advantages > 0) & (ratio > 1 + clip_eps_high),
            units=units,
        )
    return loss_sum, stats


# ---------------------------------------------------------------------------------------------
# GRPO, DAPO, Dr.GRPO: one PPO-clipped ratio per token, aggregated differently
# ---------------------------------------------------------------------------------------------


def _ppo_token_loss(log_ratio, advantages, mask, weight, eps_low, eps_high):
    """-min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) w, rho_t = exp(d_t); `[B, T]`, 0 off mask."""
    ratio = torch.exp(log_ratio)
    objective = torch.minimum(ratio * advantages, ratio.clamp(1 - eps_low, 1 + eps_high) * advantages)
    token_loss = torch.where(mask, -objective * weight, 0.0)
    with torch.no_grad():
        stats = ClipStats(
            low=mask & (advantages < 0) & (ratio < 1 - eps_low),
            high=mask & (advantages > 0) & (ratio > 1 + eps_high),
            units=mask,
        )
    return token_loss, stats


def grpo_objective(log_ratio, advantages, mask, weight, *, clip_eps_low, clip_eps_high):
    """GRPO, Eq. 1 of the GMPO paper (token mean within a sequence, mean over sequences):

        L = (1/G) sum_i (1/|o_i|) sum_{t in o_i} -min(rho_t A_i, clip(rho_t, 1-eps_low, 1+eps_high) A_i) w

    log_ratio `[B, T]`, advantages `[B, T]`, mask `[B, T]`, weight `[B, T]`, `[B, 1]` or 1.
    """
    token_loss, stats = _ppo_token_loss(log_ratio, advantages, mask, weight, clip_eps_low, clip_eps_high)
    seq_loss = token_loss.sum(-1) / mask.sum(-1).clamp(min=1)
    return seq_loss.sum(), stats


def dapo_objective(log_ratio, advantages, mask, weight, *, clip_eps_low, clip_eps_high):
    """DAPO (arXiv 2503.14476): clip-higher and token-mean over the whole global batch:

        L = (1 / sum_i |o_i|) sum_i sum_{t in o_i} -min(rho_t A_i, clip(rho_t, 1-eps_low, 1+eps_high) A_i) w

    (the caller's normalizer is the global response-token count).
    """
    token_loss, stats = _ppo_token_loss(log_ratio, advantages, mask, weight, clip_eps_low, clip_eps_high)
    return token_loss.sum(), stats


def dr_grpo_objective(log_ratio, advantages, mask, weight, *, clip_eps_low, clip_eps_high, max_response_length):
    """Dr.GRPO (arXiv 2503.20783): no 1/|o_i|; a constant length instead, mean over sequences:

        L = (1/G) sum_i (1/max_response_length) sum_{t in o_i} -min(rho_t A_i, clip(rho_t, ...) A_i) w
    """
    token_loss, stats = _ppo_token_loss(log_ratio, advantages, mask, weight, clip_eps_low, clip_eps_high)
    return token_loss.sum() / max_response_length, stats
