"""One step's training batch, with DAPO dynamic sampling: draw more prompts until the batch holds
the requested number of informative groups.

A group is the ``n`` rollouts of one prompt; it is *informative* when its rewards are not all
equal (GRPO-family advantages give every member of an all-equal group exactly 0, so it carries no
learning signal). Without dynamic sampling the step trains on the one round of
``num_groups`` prompts it drew, informative or not. With it (DAPO, arXiv 2503.14476, Sec. 3.2),
each round draws the next ``num_groups`` prompts of the data stream and keeps their informative
groups, until ``num_groups`` are kept (the batch is then cut to exactly that many, in stream
order) or ``max_rounds`` rounds ran (the batch keeps what it has, possibly nothing).

Determinism: round r of a step samples with ``round_seed(step_seed, r)`` (round 0 with the step
seed itself, so round 0 is exactly the step a run without dynamic sampling makes) and consumes
the next ``num_groups`` positions of the data stream; ``end_position`` is where the next step
continues, so a resumed run sees the same rows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from gmpo_megatron.algo.advantages import dynamic_sampling_filter
from gmpo_megatron.rollout.collect import ScoredRollouts

__all__ = ["StepRollouts", "sample_step", "round_seed"]


def round_seed(step_seed: int, round_index: int) -> int:
    """The sampling seed of round ``round_index`` of a step (round 0: the step's own seed)."""
    return (step_seed + round_index * 104_729) % (2**31 - 1)


@dataclass
class StepRollouts:
    train: ScoredRollouts  # the groups to train on; group ids are unique over the step's rounds
    generated: ScoredRollouts  # every rollout generated this step, all rounds
    rounds: int  # sampling rounds run
    kept_groups: int  # groups in `train`
    informative_groups: int  # groups of `train` whose rewards are not all equal
    end_position: int  # the data-stream position the next step starts from

    def stats(self) -> dict[str, float]:
        """Reward and length statistics over every rollout generated this step (an unbiased
        picture of the current policy, unlike the kept groups), and the group counts."""
        _, all_equal = dynamic_sampling_filter(self.generated.rewards, self.generated.groups)
        return dict(
            self.generated.stats(),
            all_equal_reward_groups=float(all_equal),
            num_groups=float(len(torch.unique(self.generated.groups))),
            kept_groups=float(self.kept_groups),
            informative_groups=float(self.informative_groups),
            dynamic_sampling_rounds=float(self.rounds),
        )


def _concat(parts: list[ScoredRollouts]) -> ScoredRollouts:
    """One ScoredRollouts from several, field by field (lists joined, tensors concatenated,
    counts added)."""
    joined = {}
    for f in dataclasses.fields(ScoredRollouts):
        values = [getattr(p, f.name) for p in parts]
        if isinstance(values[0], torch.Tensor):
            joined[f.name] = torch.cat(values)
        elif isinstance(values[0], list):
            joined[f.name] = [item for value in values for item in value]
        else:
            joined[f.name] = sum(values)
    return ScoredRollouts(**joined)


def _select(scored: ScoredRollouts, keep: torch.Tensor) -> ScoredRollouts:
    """The rollouts of ``scored`` where ``keep`` `[N]` is true (per-step counts kept as they are)."""
    index = keep.nonzero().flatten().tolist()
    return dataclasses.replace(scored, rollouts=[scored.rollouts[i] for i in index],
                               rewards=scored.rewards[keep], groups=scored.groups[keep])


def sample_step(prompt_batches: Iterator, generate: Callable[[object, int], ScoredRollouts], *,
                num_groups: int, step_seed: int, dynamic: bool, max_rounds: int) -> StepRollouts:
    """The step's batch from ``prompt_batches`` (an endless iterator of PromptBatch of
    ``num_groups`` prompts, starting at the step's data position) and ``generate(batch, seed)``
    (samples and scores a batch; its groups are the prompt indices 0..num_groups-1).

    dynamic=False: one round, every group kept. dynamic=True: up to ``max_rounds`` rounds, only
    informative groups kept, at most ``num_groups`` of them.
    """
    if max_rounds < 1:
        raise ValueError(f"max_rounds={max_rounds}; it must be >= 1")
    generated, kept, end_position, rounds = [], [], None, 0
    for rounds in range(1, (max_rounds if dynamic else 1) + 1):
        batch = next(prompt_batches)
        end_position = batch.end_position
        scored = generate(batch, round_seed(step_seed, rounds - 1))
        # group ids unique over the step: round r's prompts are r*num_groups .. (r+1)*num_groups-1
        scored = dataclasses.replace(scored, groups=scored.groups + (rounds - 1) * num_groups)
        generated.append(scored)
        if not dynamic:
            kept.append(scored)
            break
        keep, _ = dynamic_sampling_filter(scored.rewards, scored.groups)
        kept.append(_select(scored, keep))
        if sum(len(torch.unique(k.groups)) for k in kept) >= num_groups:
            break
    train = _concat(kept)
    if dynamic:  # cut to the first num_groups informative groups, in stream order
        first = torch.unique(train.groups)[:num_groups]
        train = _select(train, torch.isin(train.groups, first))
    _, all_equal = dynamic_sampling_filter(train.rewards, train.groups) if len(train.rollouts) else (None, 0)
    kept_groups = len(torch.unique(train.groups))
    return StepRollouts(train=train, generated=_concat(generated), rounds=rounds, kept_groups=kept_groups,
                        informative_groups=kept_groups - all_equal, end_position=end_position)
