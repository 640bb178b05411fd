"""Metrics: weighted means, mins and maxes that merge across micro-batches and all-reduce
across ranks."""

from __future__ import annotations

import math

import pytest
import torch
from algo_gloo import run_gloo

from gmpo_megatron.algo.metrics import Metrics, add_masked_stats, response_length_stats


def test_merge_gives_weighted_mean_and_extremes():
    a, b = Metrics(), Metrics()
    a.add_mean("x", torch.tensor(6.0), 3)  # mean 2 over 3
    a.add_min("lo", 1.5)
    a.add_max("hi", torch.tensor(2.0, requires_grad=True) * 1)
    b.add_mean("x", 4.0, torch.tensor(1))  # mean 4 over 1
    b.add_min("lo", torch.tensor(-3.0))
    b.add_max("hi", 7)
    a.merge(b)
    assert a.to_dict() == {"hi": 7.0, "lo": -3.0, "x": 2.5}


def test_empty_metrics_report_nan():
    m = Metrics()
    m.add_mean("x", 0.0, 0)
    add_masked_stats(m, "y", torch.ones(3), torch.zeros(3, dtype=torch.bool))
    values = m.to_dict()
    assert set(values) == {"x", "y_mean", "y_min", "y_max"}
    assert all(math.isnan(v) for v in values.values())


def test_a_name_keeps_its_kind():
    m = Metrics()
    m.add_mean("x", 1.0, 1)
    with pytest.raises(ValueError, match="'x' is already a mean metric"):
        m.add_max("x", 1.0)
    with pytest.raises(ValueError, match=r"expected a scalar, got a tensor of shape \(2,\)"):
        m.add_min("z", torch.ones(2))


def test_all_reduce_is_a_noop_without_torch_distributed():
    m = Metrics()
    m.add_mean("x", 3.0, 2)
    m.all_reduce()
    assert m.to_dict() == {"x": 1.5}


def test_response_length_stats_ignore_padding_rows():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1], [0, 1, 0]])
    assert response_length_stats(mask).to_dict() == {"response_len_max": 3.0, "response_len_mean": 2.0, "response_len_min": 1.0}


def _reduce_worker(rank, world_size):
    m = Metrics()
    m.add_mean("x", torch.tensor([10.0, 1.0][rank]), [4, 1][rank])  # means 2.5 and 1.0
    m.add_min("lo", [0.5, -2.0][rank])
    m.add_max("hi", torch.tensor([9.0, 3.0][rank]))
    if rank == 1:  # a name only one rank has: the other contributes the identity
        m.add_mean("only_rank1", 6.0, 3)
        m.add_max("hi_rank1", -1.0)
    m.all_reduce()
    return m.to_dict()


@pytest.mark.slow
def test_all_reduce_across_two_gloo_processes():
    expected = {"hi": 9.0, "hi_rank1": -1.0, "lo": -2.0, "only_rank1": 2.0, "x": 11.0 / 5}
    for result in run_gloo(2, _reduce_worker):
        assert result == pytest.approx(expected, rel=1e-15)
