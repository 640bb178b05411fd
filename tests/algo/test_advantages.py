"""Advantage estimators against a float64 reference written with python's statistics module,
the dynamic-sampling filter, and the errors."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from gmpo_megatron.algo.advantages import compute_advantages, dynamic_sampling_filter
from gmpo_megatron.algo.metrics import all_equal_reward_groups


def _reference(mode, rewards, group_ids, std_eps=1e-6, log_reward_eps=1e-6, normalize_std=False):
    """Per-group loops; statistics.stdev is the unbiased (n-1) sample std."""
    rewards, group_ids = rewards.tolist(), group_ids.tolist()
    out = [0.0] * len(rewards)
    for g in set(group_ids):
        members = [i for i, gid in enumerate(group_ids) if gid == g]
        values = [rewards[i] for i in members]
        if mode == "log_reward_baseline":
            values = [math.log(max(v, log_reward_eps)) for v in values]
        if len(set(values)) == 1:
            continue  # all equal: no signal, advantage 0
        mean = statistics.fmean(values)
        std = statistics.stdev(values)
        for i, v in zip(members, values):
            if mode == "grpo" or (mode == "log_reward_baseline" and normalize_std):
                out[i] = (v - mean) / (std + std_eps)
            else:
                out[i] = v - mean
    return torch.tensor(out, dtype=torch.float64)


def _rewards(seed, n=24, groups=6):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 3, (n,), generator=g).double() * torch.rand(n, generator=g, dtype=torch.float64)
    group_ids = torch.randperm(n, generator=g) % groups * 7 + 100  # shuffled, non-contiguous ids
    # one group with all-equal rewards, one with a single member
    rewards[group_ids == group_ids[0]] = 0.5
    group_ids[1] = 999
    return rewards, group_ids


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(
    "mode,options",
    [
        ("grpo", {}),
        ("grpo", {"std_eps": 0.1}),
        ("dr_grpo", {}),
        ("log_reward_baseline", {}),
        ("log_reward_baseline", {"normalize_std": True, "log_reward_eps": 1e-3}),
    ],
)
def test_advantages_match_float64_reference(seed, mode, options):
    rewards, group_ids = _rewards(seed)
    got = compute_advantages(mode, rewards, group_ids, **options)
    torch.testing.assert_close(got, _reference(mode, rewards, group_ids, **options), rtol=1e-12, atol=1e-12)
    assert (got[group_ids == group_ids[0]] == 0).all()
    assert got[1] == 0  # a single-member group


def test_group_size_int_equals_consecutive_group_ids():
    rewards = torch.rand(32, generator=torch.Generator().manual_seed(0))
    a = compute_advantages("grpo", rewards, 8)
    b = compute_advantages("grpo", rewards, torch.arange(32) // 8)
    assert torch.equal(a, b) and a.dtype == torch.float32


def test_grpo_binary_rewards_use_unbiased_std():
    # 2 of 4 correct: mean 0.5, unbiased std sqrt(1/3) -> +-0.866
    adv = compute_advantages("grpo", torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64), 4, std_eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([1, -1, 1, -1], dtype=torch.float64) * math.sqrt(3) / 2)


def test_log_reward_baseline_clamps_nonpositive_rewards():
    rewards = torch.tensor([0.0, -2.0, math.e, 1.0], dtype=torch.float64)
    adv = compute_advantages("log_reward_baseline", rewards, 4, log_reward_eps=1e-2)
    logs = torch.tensor([math.log(1e-2), math.log(1e-2), 1.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(adv, logs - logs.mean())


def test_dynamic_sampling_filter_drops_all_equal_groups():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.3, 0.3, 0.7])
    group_ids = torch.tensor([5, 5, 9, 9, 2, 2, 7, 7, 3])
    keep, dropped = dynamic_sampling_filter(rewards, group_ids)
    assert keep.tolist() == [False, False, True, True, False, False, False, False, False]
    assert dropped == 4  # groups 5, 2, 7 and the single-member group 3
    assert all_equal_reward_groups(rewards, group_ids) == 4
    keep, dropped = dynamic_sampling_filter(torch.tensor([0.0, 1.0, 1.0, 1.0]), 2)
    assert keep.tolist() == [True, True, False, False] and dropped == 1


@pytest.mark.parametrize(
    "call,error,message",
    [
        (
            lambda r: compute_advantages("gmpo", r, 2),
            ValueError,
            r"unknown advantage mode 'gmpo'; allowed: \['dr_grpo', 'grpo', 'log_reward_baseline'\]",
        ),
        (lambda r: compute_advantages("grpo", r, 2, normalize_std=False), ValueError, "does not take option normalize_std"),
        (lambda r: compute_advantages("dr_grpo", r, 2, log_reward_eps=0.1), ValueError, "belongs to \\['log_reward_baseline'\\]"),
        (lambda r: compute_advantages("grpo", r, 3), ValueError, "group size 3 does not divide the 4 rewards"),
        (lambda r: compute_advantages("grpo", r, torch.zeros(3, dtype=torch.long)), ValueError, r"shape \[4\]"),
        (lambda r: compute_advantages("grpo", r, torch.zeros(4)), ValueError, "integer tensor"),
        (lambda r: compute_advantages("grpo", r, 2.0), TypeError, "int group size"),
        (lambda r: compute_advantages("grpo", r.long(), 2), ValueError, r"\[N\] float tensor"),
        (lambda r: compute_advantages("grpo", r * math.nan, 2), ValueError, "4 of 4 rewards are not finite"),
        (lambda r: compute_advantages("log_reward_baseline", r, 2, log_reward_eps=0.0), ValueError, "log_reward_eps must be > 0"),
    ],
)
def test_errors_name_the_bad_value(call, error, message):
    with pytest.raises(error, match=message):
        call(torch.tensor([1.0, 0.0, 0.5, 0.5]))
