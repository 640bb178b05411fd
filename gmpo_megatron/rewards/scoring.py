"""Checked batch scoring: one reward per response, in this process or in worker processes.

Every reward is checked right where it is made, so a bad one is reported as the reward it is
(naming the sample, its ground truth and the value), not steps later as a NaN loss:

- it must be a real number (bools count as 0/1);
- it must be finite and ``|reward| <= MAX_ABS_REWARD``.

Why a magnitude bound: 1e308 is finite, but the group mean of two of them overflows to inf, and
the advantages of ``dr_grpo`` (raw reward differences) enter the fp32 loss unscaled. Rewards are
scores (0/1, a format bonus, a few points); 1e6 leaves room for any reasonable scale and keeps
the group statistics exact in float64. Rescale a reward that needs more.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gmpo_megatron.rewards.registry import RewardFn
    from gmpo_megatron.rewards.workers import RewardWorkers

MAX_ABS_REWARD = 1e6


class RewardError(ValueError):
    """A reward function misbehaved on a sample (raised, or returned a non-number / non-finite /
    too large value)."""


@dataclass(frozen=True)
class BatchScores:
    rewards: list[float]  # [N], in the order of the responses
    timeouts: int = 0  # samples whose call ran past reward.timeout_s (scored reward.timeout_score)


# The outcome of one call, as both the in-process loop and the workers report it:
# ("ok", float) | ("not_a_number", repr, type name) | ("error", "Type: message") | ("timeout",)
Outcome = tuple


def call_reward(fn: RewardFn, response: str, ground_truth: str, extra: dict[str, Any] | None) -> Outcome:
    """One call of `fn`, its result or exception turned into an `Outcome` (picklable)."""
    try:
        value = fn(response, ground_truth, extra if extra is not None else {})
    except Exception as error:  # noqa: BLE001 - reported by score_batch with the sample
        return ("error", f"{type(error).__name__}: {error}")
    if not isinstance(value, numbers.Real):
        return ("not_a_number", repr(value), type(value).__name__)
    return ("ok", float(value))


def score_batch(
    fn: RewardFn | RewardWorkers,
    responses: Sequence[str],
    ground_truths: Sequence[str],
    extras: Sequence[dict[str, Any] | None] | None = None,
) -> BatchScores:
    """`fn(responses[i], ground_truths[i], extras[i] or {})` for every i, each checked (see the
    module doc). `fn` is a reward function (called here, one after another) or a `RewardWorkers`
    pool (called in its workers, in parallel, with a time limit per call). Raises RewardError
    naming the sample index, its ground truth and the value for the first bad reward."""
    from gmpo_megatron.rewards.workers import RewardWorkers

    if extras is None:
        extras = [None] * len(responses)
    if not (len(responses) == len(ground_truths) == len(extras)):
        raise ValueError(
            f"score_batch needs one ground truth and one extra per response; got {len(responses)} "
            f"responses, {len(ground_truths)} ground truths, {len(extras)} extras"
        )
    if isinstance(fn, RewardWorkers):
        name, outcomes = fn.spec, fn.outcomes(responses, ground_truths, extras)
        timeout_score = fn.timeout_score
    else:
        name = getattr(fn, "__qualname__", type(fn).__name__)
        outcomes = [call_reward(fn, *sample) for sample in zip(responses, ground_truths, extras)]
        timeout_score = None
    rewards, timeouts = [], 0
    for index, outcome in enumerate(outcomes):
        if outcome[0] == "timeout":
            timeouts += 1
            rewards.append(timeout_score)
            continue
        sample = f"sample {index} (ground truth {ground_truths[index]!r}, response {responses[index][:80]!r})"
        if outcome[0] == "error":
            raise RewardError(f"reward function {name} raised on {sample}: {outcome[1]}")
        if outcome[0] == "not_a_number":
            raise RewardError(
                f"reward function {name} returned {outcome[1]} ({outcome[2]}) for {sample}; a reward "
                f"must be a Python float such as 1.0 (convert tensors/arrays with float())"
            )
        value = outcome[1]
        if not (math.isfinite(value) and abs(value) <= MAX_ABS_REWARD):
            raise RewardError(
                f"reward function {name} returned {value} for {sample}; rewards must be finite with "
                f"|reward| <= {MAX_ABS_REWARD:g}: fix the function or rescale/clamp its output"
            )
        rewards.append(value)
    return BatchScores(rewards, timeouts)
