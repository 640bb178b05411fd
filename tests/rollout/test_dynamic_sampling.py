"""DAPO dynamic sampling (rollout/dynamic_sampling.py) with a scripted generator: which groups a
step keeps, how many rounds it samples, which seeds and data positions it uses."""

from __future__ import annotations

import torch

from gmpo_megatron.data.dataset import PromptDataset
from gmpo_megatron.rollout.collect import ScoredRollouts
from gmpo_megatron.rollout.dynamic_sampling import round_seed, sample_step
from gmpo_megatron.rollout.engine import Rollout

N_SAMPLES = 4


def _dataset(rows: int) -> PromptDataset:
    return PromptDataset(prompt_ids=[[i] for i in range(rows)], ground_truths=[str(i) for i in range(rows)],
                         data_sources=["t"] * rows, extra_infos=[{} for _ in range(rows)])


def _generator(informative_rows: set[int], seeds: list[int]):
    """Row r's group has rewards [1, 0, 0, 0] if r is informative, else all 0."""
    def generate(batch, seed):
        seeds.append(seed)
        rollouts, rewards = [], []
        for i, prompt in enumerate(batch.prompt_ids):
            for k in range(N_SAMPLES):
                rollouts.append(Rollout(i, prompt, [7], [-0.5], "stop"))
                rewards.append(1.0 if k == 0 and prompt[0] in informative_rows else 0.0)
        return ScoredRollouts(rollouts, torch.tensor(rewards, dtype=torch.float64),
                              torch.tensor([o.prompt_index for o in rollouts]))
    return generate


def _rows(scored: ScoredRollouts) -> list[int]:
    return sorted({o.prompt_ids[0] for o in scored.rollouts})


def test_without_dynamic_sampling_one_round_keeps_every_group():
    data, seeds = _dataset(40), []
    step = sample_step(data.batches(4, 3, 8), _generator({1, 2}, seeds), num_groups=4, step_seed=11,
                       dynamic=False, max_rounds=4)
    assert step.rounds == 1 and seeds == [11] and step.end_position == 12
    assert step.kept_groups == 4 and len(step.train.rollouts) == 16
    assert step.train.rollouts == step.generated.rollouts
    assert step.stats()["kept_groups"] == 4 and step.stats()["dynamic_sampling_rounds"] == 1


def test_refill_rounds_until_enough_informative_groups_then_cut_in_stream_order():
    data, seeds = _dataset(40), []
    stream = [r for b, _ in zip(data.batches(4, 3, 0), range(10)) for r in b.indices]
    informative = set(stream[1:20:3])  # positions 1, 4, 7, ...: 1-2 per round of 4
    step = sample_step(data.batches(4, 3, 0), _generator(informative, seeds), num_groups=4, step_seed=11,
                       dynamic=True, max_rounds=8)
    first_four = [r for r in stream if r in informative][:4]
    assert step.rounds == 3 and step.end_position == 12  # positions 1, 4, 7, 10 lie in rounds 1-3
    assert seeds == [round_seed(11, r) for r in range(3)] and seeds[0] == 11
    assert _rows(step.train) == sorted(first_four)
    assert step.kept_groups == step.informative_groups == 4
    assert len(torch.unique(step.train.groups)) == 4  # group ids stay unique across rounds
    stats = step.stats()
    assert stats["num_groups"] == 12 and stats["all_equal_reward_groups"] == 8
    assert stats["reward_mean"] == 4 / 48  # over every generated rollout, not only the kept ones
    assert stats["dynamic_sampling_rounds"] == 3


def test_no_informative_group_after_max_rounds_keeps_nothing():
    data, seeds = _dataset(40), []
    step = sample_step(data.batches(4, 3, 0), _generator(set(), seeds), num_groups=4, step_seed=5,
                       dynamic=True, max_rounds=3)
    assert step.rounds == 3 and step.end_position == 12 and step.kept_groups == 0
    assert step.train.rollouts == [] and step.informative_groups == 0


def test_partial_batch_after_max_rounds_and_same_inputs_same_batch():
    data = _dataset(40)
    stream = [r for b, _ in zip(data.batches(4, 3, 0), range(10)) for r in b.indices]
    informative = {stream[2], stream[9]}
    runs = [sample_step(data.batches(4, 3, 0), _generator(informative, []), num_groups=4, step_seed=5,
                        dynamic=True, max_rounds=3) for _ in range(2)]
    assert runs[0].kept_groups == 2 and runs[0].rounds == 3
    assert _rows(runs[0].train) == _rows(runs[1].train) == sorted(informative)
