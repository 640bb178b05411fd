"""Verifiable rewards: arithmetic, countdown, math (math-verify) and user functions."""

from gmpo_megatron.rewards.answer import answer_text
from gmpo_megatron.rewards.arithmetic import arithmetic_first_integer_reward, arithmetic_reward
from gmpo_megatron.rewards.countdown import (
    ExpressionError,
    countdown_reward,
    evaluate_expression,
    format_countdown_ground_truth,
    parse_countdown_ground_truth,
)
from gmpo_megatron.rewards.math import MathVerifyReward
from gmpo_megatron.rewards.registry import (
    RewardFn,
    get_reward_fn,
    ground_truth_check,
    register_reward_fn,
    registered_reward_names,
)
from gmpo_megatron.rewards.scoring import MAX_ABS_REWARD, BatchScores, RewardError, score_batch
from gmpo_megatron.rewards.workers import RewardWorkers

__all__ = [
    "MAX_ABS_REWARD",
    "BatchScores",
    "ExpressionError",
    "MathVerifyReward",
    "RewardError",
    "RewardFn",
    "RewardWorkers",
    "answer_text",
    "arithmetic_first_integer_reward",
    "arithmetic_reward",
    "countdown_reward",
    "evaluate_expression",
    "format_countdown_ground_truth",
    "get_reward_fn",
    "ground_truth_check",
    "parse_countdown_ground_truth",
    "register_reward_fn",
    "registered_reward_names",
    "score_batch",
]
