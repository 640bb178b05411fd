"""Independent float64 references for every policy-loss mode, written from the papers' equations
as plain python loops over sequences and tokens (no call into gmpo_megatron).

Clipping is written as a branch ("beyond the bound -> the bound, a constant"), not as the
min/clamp expression the implementation uses, so the two formulations check each other.
A reference returns (loss, counts) where loss is a 0-dim tensor carrying autograd to `log_prob`,
and counts = {"low": n, "high": n, "dual": n, "units": n} for the clip-fraction metrics.
"""

from __future__ import annotations

import math

import torch


def _const(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64)


def _tokens(mask, i):
    return [t for t in range(mask.shape[1]) if bool(mask[i, t])]


def _seq_advantage(advantages, mask, i, toks):
    if advantages.dim() == 1:
        return float(advantages[i])
    return sum(float(advantages[i, t]) for t in toks) / len(toks)


def _tis_weights(old, rollout, mask, level, cap):
    """{(i, t): w} for token level, {i: w} otherwise; plain python floats."""
    weights = {}
    for i in range(mask.shape[0]):
        toks = _tokens(mask, i)
        diffs = [float(old[i, t]) - float(rollout[i, t]) for t in toks]
        if level == "token":
            for t, d in zip(toks, diffs):
                weights[(i, t)] = min(math.exp(d), cap)
        elif toks:
            log_w = sum(diffs) if level == "sequence" else sum(diffs) / len(toks)
            weights[i] = math.exp(min(log_w, math.log(cap)))
    return weights


def reference_loss(mode, log_prob, old_log_prob, advantages, response_mask, *, normalizer=None,
                   rollout_log_prob=None, **options):
    mask = response_mask.bool()
    tis_level = options.pop("tis_level", None)
    tis_cap = options.pop("tis_cap", 2.0)
    weights = None
    if tis_level is not None:
        weights = _tis_weights(old_log_prob, rollout_log_prob, mask, tis_level, tis_cap)
    fn = {"gmpo": _gmpo, "grpo": _ppo, "dapo": _ppo, "dr_grpo": _ppo, "gspo": _gspo}[mode]
    return fn(mode, log_prob, old_log_prob, advantages, mask, normalizer, weights, **options)


def _num_sequences(mask):
    return sum(1 for i in range(mask.shape[0]) if _tokens(mask, i))


def _gmpo(mode, lp, old, adv, mask, normalizer, weights, clip_eps_low=0.4, clip_eps_high=0.4,
          clip_level="token", length_norm=True, dual_clip=None):
    counts = {"low": 0, "high": 0, "dual": 0, "units": 0}
    total = _const(0.0)
    for i in range(mask.shape[0]):
        toks = _tokens(mask, i)
        if not toks:
            continue
        A = _seq_advantage(adv, mask, i, toks)
        log_ratios = [lp[i, t] - old[i, t] for t in toks]

        def clip(x):  # one-sided by the sign of A, plus the optional dual cap for A < 0
            if A > 0 and x.item() > clip_eps_high:
                counts["high"] += 1
                return _const(clip_eps_high)
            if A < 0 and x.item() < -clip_eps_low:
                counts["low"] += 1
                return _const(-clip_eps_low)
            if A < 0 and dual_clip is not None and x.item() > dual_clip:
                counts["dual"] += 1
                return _const(dual_clip)
            return x

        if clip_level == "token":
            counts["units"] += len(toks)
            summed = sum(clip(x) for x in log_ratios)
        elif clip_level == "sequence":
            counts["units"] += 1
            summed = clip(sum(log_ratios))
        else:
            counts["units"] += len(toks)
            summed = sum(log_ratios)
        if A == 0:
            continue
        ratio = torch.exp(summed / len(toks) if length_norm else summed)
        w = 1.0 if weights is None else weights[i]
        total = total + (-A) * ratio * w
    G = _num_sequences(mask) if normalizer is None else normalizer
    return total / max(G, 1), counts


def _ppo(mode, lp, old, adv, mask, normalizer, weights, clip_eps_low=0.2, clip_eps_high=None,
         max_response_length=None):
    if clip_eps_high is None:
        clip_eps_high = 0.28 if mode == "dapo" else 0.2
    counts = {"low": 0, "high": 0, "dual": 0, "units": 0}
    total = _const(0.0)
    n_tokens = 0
    for i in range(mask.shape[0]):
        toks = _tokens(mask, i)
        seq = _const(0.0)
        for t in toks:
            A = float(adv[i]) if adv.dim() == 1 else float(adv[i, t])
            rho = torch.exp(lp[i, t] - old[i, t])
            if A > 0 and rho.item() > 1 + clip_eps_high:
                counts["high"] += 1
                objective = _const((1 + clip_eps_high) * A)
            elif A < 0 and rho.item() < 1 - clip_eps_low:
                counts["low"] += 1
                objective = _const((1 - clip_eps_low) * A)
            else:
                objective = rho * A
            if weights is not None:
                objective = objective * (weights[(i, t)] if (i, t) in weights else weights[i])
            seq = seq - objective
        counts["units"] += len(toks)
        n_tokens += len(toks)
        if not toks:
            continue
        if mode == "grpo":
            total = total + seq / len(toks)
        elif mode == "dapo":
            total = total + seq
        else:  # dr_grpo
            total = total + seq / max_response_length
    if normalizer is None:
        normalizer = n_tokens if mode == "dapo" else _num_sequences(mask)
    return total / max(normalizer, 1), counts


def _gspo(mode, lp, old, adv, mask, normalizer, weights, clip_eps_low=3e-4, clip_eps_high=4e-4):
    counts = {"low": 0, "high": 0, "dual": 0, "units": 0}
    total = _const(0.0)
    for i in range(mask.shape[0]):
        toks = _tokens(mask, i)
        if not toks:
            continue
        counts["units"] += 1
        A = _seq_advantage(adv, mask, i, toks)
        s = torch.exp(sum(lp[i, t] - old[i, t] for t in toks) / len(toks))
        if A > 0 and s.item() > 1 + clip_eps_high:
            counts["high"] += 1
            objective = _const((1 + clip_eps_high) * A)
        elif A < 0 and s.item() < 1 - clip_eps_low:
            counts["low"] += 1
            objective = _const((1 - clip_eps_low) * A)
        else:
            objective = s * A
        w = 1.0 if weights is None else weights[i]
        total = total - objective * w
    G = _num_sequences(mask) if normalizer is None else normalizer
    return total / max(G, 1), counts
