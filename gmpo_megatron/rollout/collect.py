"""One step's rollout batch: sample ``n`` responses per prompt from an engine and score them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gmpo_megatron.rewards import score_batch
from gmpo_megatron.rollout.engine import Rollout, RolloutEngine, SamplingParams


@dataclass
class ScoredRollouts:
    rollouts: list[Rollout]  # prompt-major: prompt i's n samples are contiguous
    rewards: torch.Tensor  # [N] float64
    groups: torch.Tensor  # [N] prompt index of each rollout (the advantage groups)
    reward_timeouts: int = 0  # reward calls that ran past reward.timeout_s

    def stats(self) -> dict[str, float]:
        n = len(self.rollouts)
        return {
            "reward_mean": float(self.rewards.mean()),
            "reward_std": float(self.rewards.std(unbiased=False)),
            "response_len_mean": sum(len(o.response_ids) for o in self.rollouts) / n,
            "finish_stop_frac": sum(o.finish_reason == "stop" for o in self.rollouts) / n,
            "reward_timeouts": float(self.reward_timeouts),
        }


def collect_rollouts(engine: RolloutEngine, tokenizer, prompt_ids: list[list[int]],
                     ground_truths: list[str], extra_infos: list[dict], sampling: SamplingParams,
                     reward_fn, *, seed: int) -> ScoredRollouts:
    """Generate ``sampling.n`` responses per prompt and score each response text against its
    prompt's ground truth (each reward checked by ``score_batch``; ``reward_fn`` may be a
    ``RewardWorkers`` pool)."""
    rollouts = engine.generate(prompt_ids, sampling, seed=seed)
    texts = [tokenizer.decode(o.response_ids, skip_special_tokens=True) for o in rollouts]
    truths = [ground_truths[o.prompt_index] for o in rollouts]
    extras = [extra_infos[o.prompt_index] for o in rollouts]
    scores = score_batch(reward_fn, texts, truths, extras)
    rewards = torch.tensor(scores.rewards, dtype=torch.float64)
    groups = torch.tensor([o.prompt_index for o in rollouts])
    return ScoredRollouts(rollouts, rewards, groups, scores.timeouts)
