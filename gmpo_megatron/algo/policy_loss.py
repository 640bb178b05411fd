"""Policy losses: GMPO (arXiv 2507.20673) and the baselines it is compared with.

Every mode is a short `*_objective` function (objectives.py) that returns the *sum* of its
per-sequence (or per-token) losses; `policy_loss` divides that sum by a normalizer. With the GLOBAL normalizer
(number of sequences, or of response tokens, in the whole global batch) the losses of all
micro-batches and data-parallel ranks add up to exactly the global-batch loss, and so do their
gradients. This is what public implementations get wrong when they take a mean over the
micro-batch: their gradient scale then depends on the micro-batch split and the DP size.

Notation: `d_t = log_prob_t - old_log_prob_t` (token log-ratio, 0 outside the response mask),
`|o_i|` the number of response tokens of sequence i, `A_i` its advantage, `s_i = sign(A_i)`,
`w` the optional truncated-IS weight (see mismatch.py, 1 without it), G the normalizer.

A sequence (row) without any response token is padding: it contributes zero loss and zero
gradient, and is not counted by `local_normalizer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping

import torch

from gmpo_megatron.algo.metrics import Metrics, add_masked_stats, response_length_stats
from gmpo_megatron.algo.mismatch import TIS_LEVELS, add_mismatch_metrics, truncated_is_weights
from gmpo_megatron.algo.objectives import (
    ClipStats,
    dapo_objective,
    dr_grpo_objective,
    gmpo_objective,
    grpo_objective,
    gspo_objective,
)

__all__ = ["LOSS_MODES", "policy_loss", "loss_normalizer_kind", "local_normalizer"]

NormalizerKind = Literal["sequences", "tokens"]

LOG_RATIO_THRESHOLDS = (0.1, 0.2, 0.4, 1.0)
"""|d_t| thresholds of the `log_ratio_abs_gt_{x}` metrics (fraction of response tokens beyond x)."""


# ---------------------------------------------------------------------------------------------
# Registry and option checking
# ---------------------------------------------------------------------------------------------


def _check_eps(mode, opts, ratio_space):
    for name in ("clip_eps_low", "clip_eps_high"):
        value = opts[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{mode}: {name} must be a number >= 0, got {value!r}")
    if ratio_space and opts["clip_eps_low"] > 1:
        raise ValueError(
            f"{mode}: clip_eps_low={opts['clip_eps_low']} makes the ratio bound 1 - eps negative; "
            "use a value in [0, 1] (1 disables the lower clip)"
        )


def _check_gmpo(mode, opts, given):
    _check_eps(mode, opts, ratio_space=False)
    if opts["clip_level"] not in ("token", "sequence", "none"):
        raise ValueError(f"gmpo: clip_level={opts['clip_level']!r}; allowed: 'token', 'sequence', 'none'")
    if not isinstance(opts["length_norm"], bool):
        raise ValueError(f"gmpo: length_norm must be True or False, got {opts['length_norm']!r}")
    if opts["clip_level"] == "none":
        # dual_clip=None is the "off" value and harmless; a bound would silently do nothing
        pointless = sorted(given & {"clip_eps_low", "clip_eps_high"})
        pointless += ["dual_clip"] if opts["dual_clip"] is not None else []
        if pointless:
            raise ValueError(
                f"gmpo: option(s) {pointless} have no effect with clip_level='none'; drop them or "
                "choose clip_level='token' or 'sequence'"
            )
    dual = opts["dual_clip"]
    if dual is not None and (isinstance(dual, bool) or not isinstance(dual, (int, float)) or not dual > 0):
        raise ValueError(
            f"gmpo: dual_clip must be None or a log-space cap > 0 (PPO's c=3 is log(3)=1.0986), got {dual!r}"
        )


def _check_ppo(mode, opts, given):
    _check_eps(mode, opts, ratio_space=True)


def _check_dr_grpo(mode, opts, given):
    _check_ppo(mode, opts, given)
    length = opts["max_response_length"]
    if length is None:
        raise ValueError("dr_grpo requires max_response_length=<the generation limit in tokens>, e.g. 3000")
    if isinstance(length, bool) or not isinstance(length, (int, float)) or not length > 0:
        raise ValueError(f"dr_grpo: max_response_length must be a positive number, got {length!r}")


@dataclass(frozen=True)
class LossMode:
    objective: Callable[..., tuple[torch.Tensor, ClipStats]]
    defaults: Mapping[str, Any]
    check: Callable[[str, dict, set], None]
    normalizer_kind: NormalizerKind
    sequence_level: bool  # one ratio per sequence: [B] advantages and per-sequence TIS weights


_PPO_EPS = {"clip_eps_low": 0.2, "clip_eps_high": 0.2}

LOSS_MODES: dict[str, LossMode] = {
    "gmpo": LossMode(
        objective=gmpo_objective,
        defaults={
            "clip_eps_low": 0.4,
            "clip_eps_high": 0.4,
            "clip_level": "token",
            "length_norm": True,
            "dual_clip": None,
        },
        check=_check_gmpo,
        normalizer_kind="sequences",
        sequence_level=True,
    ),
    "grpo": LossMode(
        objective=grpo_objective,
        defaults=_PPO_EPS,
        check=_check_ppo,
        normalizer_kind="sequences",
        sequence_level=False,
    ),
    "dapo": LossMode(
        objective=dapo_objective,
        defaults={"clip_eps_low": 0.2, "clip_eps_high": 0.28},  # clip-higher
        check=_check_ppo,
        normalizer_kind="tokens",
        sequence_level=False,
    ),
    "dr_grpo": LossMode(
        objective=dr_grpo_objective,
        defaults={**_PPO_EPS, "max_response_length": None},  # required: checked by _check_dr_grpo
        check=_check_dr_grpo,
        normalizer_kind="sequences",
        sequence_level=False,
    ),
    "gspo": LossMode(
        objective=gspo_objective,
        defaults={"clip_eps_low": 3e-4, "clip_eps_high": 4e-4},
        check=_check_ppo,
        normalizer_kind="sequences",
        sequence_level=True,
    ),
}

_TIS_OPTIONS = ("tis_level", "tis_cap")
DEFAULT_TIS_CAP = 2.0


def _resolve(mode: str, options: dict[str, Any]) -> tuple[LossMode, dict[str, Any], dict[str, Any]]:
    """(mode spec, objective options with defaults, TIS options) or a ValueError naming the fix."""
    if mode not in LOSS_MODES:
        raise ValueError(f"unknown policy loss mode {mode!r}; allowed: {sorted(LOSS_MODES)}")
    spec = LOSS_MODES[mode]
    allowed = sorted([*spec.defaults, *_TIS_OPTIONS])
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"policy loss mode {mode!r} has no option(s) {unknown}; allowed: {allowed}")
    opts = {**spec.defaults, **{k: v for k, v in options.items() if k not in _TIS_OPTIONS}}
    spec.check(mode, opts, set(options))

    tis = {"level": options.get("tis_level"), "cap": options.get("tis_cap")}
    if tis["level"] is None:
        if tis["cap"] is not None:
            raise ValueError(f"tis_cap={tis['cap']!r} given without tis_level; add tis_level={list(TIS_LEVELS)}")
    else:
        if tis["level"] not in TIS_LEVELS:
            raise ValueError(f"unknown tis_level {tis['level']!r}; allowed: {list(TIS_LEVELS)}")
        if spec.sequence_level and tis["level"] == "token":
            raise ValueError(
                f"{mode} has one ratio per sequence, so a per-token IS weight has nothing to multiply; "
                "use tis_level='geometric' (matches the geometric-mean ratio) or 'sequence'"
            )
        tis["cap"] = DEFAULT_TIS_CAP if tis["cap"] is None else tis["cap"]
        if isinstance(tis["cap"], bool) or not isinstance(tis["cap"], (int, float)) or not tis["cap"] > 0:
            raise ValueError(f"tis_cap must be a number > 0 (e.g. 2.0), got {tis['cap']!r}")
    return spec, opts, tis


def loss_normalizer_kind(mode: str, **options: Any) -> NormalizerKind:
    """What the trainer must count over the global batch to build `normalizer=`:

    "sequences" (gmpo, grpo, dr_grpo, gspo): sequences with at least one response token;
    "tokens" (dapo): response tokens. Validates `options` like `policy_loss`.
    """
    return _resolve(mode, options)[0].normalizer_kind


def local_normalizer(mode: str, response_mask: torch.Tensor, **options: Any) -> torch.Tensor:
    """This micro-batch's share of the normalizer (0-dim float tensor, on the mask's device).

    Sum it over micro-batches and all-reduce (SUM) over data-parallel ranks to get the global
    `normalizer=` for `policy_loss`. response_mask `[B, T]`.
    """
    mask = response_mask.bool()
    count = mask.sum() if loss_normalizer_kind(mode, **options) == "tokens" else mask.any(-1).sum()
    return count.to(torch.float64)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def _check_inputs(log_prob, old_log_prob, advantages, response_mask, rollout_log_prob):
    if log_prob.dim() != 2 or not log_prob.is_floating_point():
        raise ValueError(f"log_prob must be a [B, T] float tensor, got {log_prob.dtype} {tuple(log_prob.shape)}")
    shape = tuple(log_prob.shape)
    others = {"old_log_prob": old_log_prob, "response_mask": response_mask, "rollout_log_prob": rollout_log_prob}
    for name, tensor in others.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape} like log_prob")
    if tuple(advantages.shape) not in ((shape[0],), shape):
        raise ValueError(
            f"advantages has shape {tuple(advantages.shape)}; expected [B]=({shape[0]},) or [B, T]={shape}"
        )


def _divide(loss_sum: torch.Tensor, normalizer) -> torch.Tensor:
    # A count of 0 means an empty global batch: every loss_sum is 0 then, and 0/1 keeps it 0.
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer must be a number or a 0-dim tensor, got shape {tuple(normalizer.shape)}")
        return loss_sum / normalizer.detach().reshape(()).to(loss_sum).clamp(min=1)
    if isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)) or not normalizer >= 0:
        raise ValueError(f"normalizer must be a count >= 0 (global sequences or tokens), got {normalizer!r}")
    return loss_sum / max(float(normalizer), 1.0)


def policy_loss(
    mode: str,
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    normalizer: float | torch.Tensor | None = None,
    rollout_log_prob: torch.Tensor | None = None,
    **options: Any,
) -> tuple[torch.Tensor, Metrics]:
    """Policy loss of one micro-batch as a share of the global-batch loss, and its metrics.

    log_prob `[B, T]` (carries the gradient), old_log_prob `[B, T]` (pi_old, detached here),
    advantages `[B]` or `[B, T]` (detached), response_mask `[B, T]` bool or 0/1,
    rollout_log_prob `[B, T]` (the rollout engine's log-probs, optional).

    normalizer: the GLOBAL count of `loss_normalizer_kind(mode, **options)` (python number or
    0-dim tensor; see `local_normalizer`). None uses this micro-batch's own count, which is right
    only when the micro-batch is the whole global batch.

    Sequence-level modes (gmpo, gspo) take A_i = the mean of a `[B, T]` advantage over the
    response tokens (= the advantage itself when it is broadcast from one value per sequence, as
    every estimator in advantages.py produces). Token-level modes broadcast a `[B]` advantage.

    options: per mode (defaults in LOSS_MODES) plus, for any mode, `tis_level` ("token" (not for
    gmpo/gspo), "sequence", "geometric") and `tis_cap` (default 2.0) — truncated IS towards the
    rollout policy, which needs rollout_log_prob. rollout_log_prob without tis_level only adds the
    mismatch metrics. Unknown or meaningless options raise ValueError.

    Values at positions outside response_mask are never read (they may be any garbage, inf or nan
    included), and get exactly zero gradient. Computation is in float32 (float64 for float64
    inputs); the loss has that dtype.

    Metrics (weighted means over response tokens unless noted; see Metrics.to_dict):
      log_ratio_mean|_min|_max   d_t = log_prob - old_log_prob (the IS-ratio range, log space)
      seq_log_ratio_mean         mean over sequences of sum_t d_t / |o_i| (unclipped)
      log_ratio_p0.1|_p1|_p99|_p99.9, seq_log_ratio_p...   nearest-rank percentiles of d_t over
                                 response tokens / of sum_t d_t / |o_i| over sequences, from a
                                 histogram that merges exactly (Metrics.add_percentiles: within
                                 0.5% relative, or 1e-9 absolute, of the exact value)
      log_ratio_abs_gt_{x}       fraction of response tokens with |d_t| > x, x in LOG_RATIO_THRESHOLDS
      clipfrac_low, clipfrac_high, clipfrac   units clipped on the side active for sign(A):
                                 low only for A < 0, high only for A > 0; units are response
                                 tokens, or sequences for sequence-level clips (gmpo
                                 clip_level="sequence", gspo); gmpo dual_clip adds clipfrac_dual
      kl                         k3 estimate of KL(pi_old || pi_theta) per token,
                                 exp(d) - 1 - d (unbiased under tokens sampled from pi_old; it
                                 agrees with KL(pi_theta || pi_old)'s k3, exp(-d) - 1 + d, to O(d^3))
      response_len_mean|_min|_max  over sequences with response tokens
      rollout_logp_abs_diff_mean|_max, tis_weight_mean, tis_capped_frac   with rollout_log_prob
    """
    spec, opts, tis = _resolve(mode, options)
    _check_inputs(log_prob, old_log_prob, advantages, response_mask, rollout_log_prob)
    if tis["level"] is not None and rollout_log_prob is None:
        raise ValueError(f"tis_level={tis['level']!r} needs rollout_log_prob=<the rollout engine's log-probs>")

    dtype = torch.promote_types(log_prob.dtype, torch.float32)
    mask = response_mask.bool()
    lengths = mask.sum(-1)
    has_tokens = lengths > 0
    # Select before any arithmetic: torch.where sends no gradient to the unselected branch, so
    # garbage (even inf/nan) at padded positions reaches neither the loss nor the gradient.
    log_ratio = torch.where(mask, log_prob.to(dtype), 0.0) - torch.where(mask, old_log_prob.detach().to(dtype), 0.0)
    adv = advantages.detach().to(dtype)
    if adv.dim() == 2:
        adv = torch.where(mask, adv, 0.0)
        if spec.sequence_level:
            adv = adv.sum(-1) / lengths.clamp(min=1)
    else:
        adv = torch.where(has_tokens, adv, 0.0)
        if not spec.sequence_level:
            adv = adv[:, None].expand_as(log_ratio)

    weight: torch.Tensor | float = 1.0
    tis_weights = None
    if tis["level"] is not None:
        tis_weights = truncated_is_weights(
            old_log_prob.to(dtype), rollout_log_prob.to(dtype), mask, level=tis["level"], cap=tis["cap"]
        )
        # token-level modes multiply every token of a sequence by its sequence weight
        weight = tis_weights if spec.sequence_level or tis_weights.dim() == 2 else tis_weights[:, None]

    loss_sum, clip = spec.objective(log_ratio, adv, mask, weight, **opts)
    loss = _divide(loss_sum, normalizer if normalizer is not None else local_normalizer(mode, mask, **options))

    metrics = Metrics()
    with torch.no_grad():
        add_masked_stats(metrics, "log_ratio", log_ratio, mask)
        seq_log_ratio = log_ratio.sum(-1) / lengths.clamp(min=1)
        add_masked_stats(metrics, "seq_log_ratio", seq_log_ratio, has_tokens, ("mean",))
        metrics.add_percentiles("log_ratio", log_ratio, mask)
        metrics.add_percentiles("seq_log_ratio", seq_log_ratio, has_tokens)
        for threshold in LOG_RATIO_THRESHOLDS:
            beyond = mask & (log_ratio.abs() > threshold)
            metrics.add_mean(f"log_ratio_abs_gt_{threshold:g}", beyond.sum(), lengths.sum())
        n_units = clip.units.sum()
        metrics.add_mean("clipfrac_low", clip.low.sum(), n_units)
        metrics.add_mean("clipfrac_high", clip.high.sum(), n_units)
        metrics.add_mean("clipfrac", (clip.low | clip.high).sum(), n_units)
        if clip.dual is not None:
            metrics.add_mean("clipfrac_dual", clip.dual.sum(), n_units)
        d = log_ratio.to(torch.float64)
        metrics.add_mean("kl", torch.where(mask, torch.expm1(d) - d, 0.0).sum(), lengths.sum())
        response_length_stats(mask, metrics)
        if rollout_log_prob is not None:
            add_mismatch_metrics(
                metrics,
                torch.where(mask, old_log_prob.detach().to(dtype), 0.0),
                torch.where(mask, rollout_log_prob.detach().to(dtype), 0.0),
                mask,
                tis_weights,
                tis["cap"],
            )
    return loss, metrics
