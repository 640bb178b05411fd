"""Group-relative advantages (one scalar per rollout) and the dynamic-sampling filter.

A group is the set of rollouts of one prompt. Every estimator here gives exactly 0 to all members
of a group whose (estimator-input) rewards are all equal: such a group carries no signal, and
forcing 0 avoids dividing rounding noise by `std + eps`.

Modes (`compute_advantages(mode, ...)`):

- ``grpo``:  A_i = (R_i - mean_g R) / (std_g R + std_eps)
  std is the *unbiased* (Bessel-corrected, n-1) group standard deviation, i.e. `torch.std`'s
  default, because that is what the public GRPO/GMPO code the paper's numbers come from uses;
  side-by-side runs against those baselines then see the same advantage scale (the population
  std would scale every advantage by sqrt(G/(G-1)), 1.069 at G=8).
- ``dr_grpo``: A_i = R_i - mean_g R  (Dr.GRPO: no std, which biases towards easy/hard prompts).
- ``log_reward_baseline``: A_i = log R~_i - mean_g log R~, R~ = max(R, log_reward_eps), optionally
  divided by (unbiased std_g log R~ + std_eps). A geometric-mean *reward baseline* for positive,
  heavy-tailed rewards. It is NOT GMPO: GMPO (arXiv 2507.20673) is a geometric mean of token
  importance ratios inside the policy loss and uses ordinary GRPO advantages.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = [
    "ADVANTAGE_MODES",
    "compute_advantages",
    "dynamic_sampling_filter",
    "group_index",
    "group_reward_spread",
]

DEFAULT_LOG_REWARD_EPS = 1e-6


def group_index(group_ids: torch.Tensor | int, n: int) -> tuple[torch.Tensor, int]:
    """Map group ids to dense indices: returns (index `[N]` long in [0, num_groups), num_groups).

    `group_ids` is `[N]` integer ids (any values, any order) or an int group size, meaning the N
    rollouts are consecutive groups of that size.
    """
    if isinstance(group_ids, bool) or not isinstance(group_ids, (int, torch.Tensor)):
        raise TypeError(
            f"group_ids must be an int group size or a [N] integer tensor, got {type(group_ids).__name__}"
        )
    if isinstance(group_ids, int):
        if group_ids < 1 or n % group_ids != 0:
            raise ValueError(
                f"group size {group_ids} does not divide the {n} rewards; pass a group size that "
                "divides N, or explicit [N] group_ids"
            )
        return torch.arange(n) // group_ids, n // group_ids
    if group_ids.shape != (n,) or group_ids.is_floating_point() or group_ids.is_complex():
        raise ValueError(
            f"group_ids must be an integer tensor of shape [{n}] (one id per reward), got "
            f"dtype {group_ids.dtype} shape {tuple(group_ids.shape)}"
        )
    unique, index = torch.unique(group_ids, return_inverse=True)
    return index, unique.numel()


def _group_sum(values: torch.Tensor, index: torch.Tensor, num_groups: int) -> torch.Tensor:
    return torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, index, values)


def group_reward_spread(values: torch.Tensor, index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """max - min of `values` `[N]` within each group: `[num_groups]`; 0 means all equal."""
    index = index.to(values.device)
    init = torch.zeros(num_groups, dtype=values.dtype, device=values.device)
    high = init.scatter_reduce(0, index, values, "amax", include_self=False)
    low = init.scatter_reduce(0, index, values, "amin", include_self=False)
    return high - low


def _centered(values: torch.Tensor, index: torch.Tensor, num_groups: int):
    """(values - group mean, unbiased group std broadcast to `[N]`, group sizes `[N]`)."""
    sizes = _group_sum(torch.ones_like(values), index, num_groups)
    centered = values - (_group_sum(values, index, num_groups) / sizes)[index]
    # Bessel-corrected; a group of one has no spread and is zeroed by the all-equal rule.
    var = _group_sum(centered**2, index, num_groups) / (sizes - 1).clamp(min=1)
    return centered, var.sqrt()[index]


def _grpo(rewards, index, num_groups, *, std_eps, log_reward_eps, normalize_std):
    centered, std = _centered(rewards, index, num_groups)
    return centered / (std + std_eps), rewards


def _dr_grpo(rewards, index, num_groups, *, std_eps, log_reward_eps, normalize_std):
    centered, _ = _centered(rewards, index, num_groups)
    return centered, rewards


def _log_reward_baseline(rewards, index, num_groups, *, std_eps, log_reward_eps, normalize_std):
    log_rewards = rewards.clamp(min=log_reward_eps).log()
    centered, std = _centered(log_rewards, index, num_groups)
    return (centered / (std + std_eps) if normalize_std else centered), log_rewards


# mode -> (estimator, the keyword options that mode accepts besides std_eps)
ADVANTAGE_MODES: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "grpo": (_grpo, ()),
    "dr_grpo": (_dr_grpo, ()),
    "log_reward_baseline": (_log_reward_baseline, ("log_reward_eps", "normalize_std")),
}


def compute_advantages(
    mode: str,
    rewards: torch.Tensor,
    group_ids: torch.Tensor | int,
    *,
    std_eps: float = 1e-6,
    log_reward_eps: float | None = None,
    normalize_std: bool | None = None,
) -> torch.Tensor:
    """Per-rollout advantages `[N]` (same dtype as `rewards`; computed in float64).

    rewards `[N]` float; group_ids `[N]` integer ids or an int group size. `log_reward_eps`
    (default 1e-6) and `normalize_std` (default False) belong to ``log_reward_baseline`` only;
    passing them to another mode is an error rather than silently ignored.
    """
    if mode not in ADVANTAGE_MODES:
        raise ValueError(f"unknown advantage mode {mode!r}; allowed: {sorted(ADVANTAGE_MODES)}")
    estimator, own_options = ADVANTAGE_MODES[mode]
    given = {"log_reward_eps": log_reward_eps, "normalize_std": normalize_std}
    for option, value in given.items():
        if value is not None and option not in own_options:
            raise ValueError(
                f"advantage mode {mode!r} does not take option {option}={value!r}; it belongs to "
                f"{[m for m, (_, opts) in ADVANTAGE_MODES.items() if option in opts]} "
                "(grpo always divides by the group std, dr_grpo never does)"
            )
    if rewards.dim() != 1 or not rewards.is_floating_point():
        raise ValueError(f"rewards must be a [N] float tensor, got dtype {rewards.dtype} shape {tuple(rewards.shape)}")
    if not bool(torch.isfinite(rewards).all()):
        bad = int((~torch.isfinite(rewards)).sum())
        raise ValueError(f"{bad} of {rewards.numel()} rewards are not finite; fix the reward function")
    if std_eps < 0:
        raise ValueError(f"std_eps must be >= 0, got {std_eps}")
    log_reward_eps = DEFAULT_LOG_REWARD_EPS if log_reward_eps is None else float(log_reward_eps)
    if log_reward_eps <= 0:
        raise ValueError(f"log_reward_eps must be > 0 (log of the clamped reward), got {log_reward_eps}")

    index, num_groups = group_index(group_ids, rewards.shape[0])
    index = index.to(rewards.device)
    advantages, estimator_input = estimator(
        rewards.to(torch.float64),
        index,
        num_groups,
        std_eps=std_eps,
        log_reward_eps=log_reward_eps,
        normalize_std=bool(normalize_std),
    )
    no_signal = (group_reward_spread(estimator_input, index, num_groups) == 0)[index]
    return torch.where(no_signal, 0.0, advantages).to(rewards.dtype)


def dynamic_sampling_filter(
    rewards: torch.Tensor, group_ids: torch.Tensor | int
) -> tuple[torch.Tensor, int]:
    """DAPO dynamic sampling: drop every group whose rewards are all equal.

    Returns (keep_mask `[N]` bool, number of dropped groups).
    """
    index, num_groups = group_index(group_ids, rewards.shape[0])
    index = index.to(rewards.device)
    all_equal = group_reward_spread(rewards, index, num_groups) == 0
    return ~all_equal[index], int(all_equal.sum())
