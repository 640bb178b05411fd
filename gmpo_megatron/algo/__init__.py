"""The RL math of gmpo-megatron, in pure torch (no Megatron, transformers or SGLang import).

- policy_loss: GMPO and the GRPO / DAPO / Dr.GRPO / GSPO baselines, normalised by a global count
  so that any micro-batch split and data-parallel size gives the same loss and gradients;
- advantages: group-relative advantages and the dynamic-sampling filter;
- logprobs: token log-probs and entropy from (vocab-parallel) logits, chunked, with exact gradients;
- mismatch: truncated importance sampling towards the rollout engine's distribution;
- metrics: micro-batch-mergeable, all-reducible means / mins / maxes.
"""

from gmpo_megatron.algo.advantages import ADVANTAGE_MODES, compute_advantages, dynamic_sampling_filter
from gmpo_megatron.algo.logprobs import token_log_probs
from gmpo_megatron.algo.metrics import Metrics, all_equal_reward_groups, response_length_stats
from gmpo_megatron.algo.mismatch import truncated_is_weights
from gmpo_megatron.algo.policy_loss import LOSS_MODES, local_normalizer, loss_normalizer_kind, policy_loss

__all__ = [
    "ADVANTAGE_MODES",
    "LOSS_MODES",
    "Metrics",
    "all_equal_reward_groups",
    "compute_advantages",
    "dynamic_sampling_filter",
    "local_normalizer",
    "loss_normalizer_kind",
    "policy_loss",
    "response_length_stats",
    "token_log_probs",
    "truncated_is_weights",
]
