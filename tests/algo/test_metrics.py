"""Metrics: weighted means, mins, maxes and percentiles that merge across micro-batches and
all-reduce across ranks."""

from __future__ import annotations

import math

import pytest
import torch
from algo_gloo import run_gloo

from gmpo_megatron.algo.metrics import (
    PERCENTILES,
    LogHistogram,
    Metrics,
    add_masked_stats,
    percentile_key,
    response_length_stats,
)


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


# -- percentiles (LogHistogram) -----------------------------------------------------------------

def _nearest_rank(values: torch.Tensor, pct: float) -> float:
    """The float64 reference: the ceil(pct/100 * N)-th smallest value (at least the first)."""
    ordered = values.to(torch.float64).sort().values
    return float(ordered[max(1, math.ceil(pct / 100 * ordered.numel())) - 1])


def _assert_within_resolution(got: float, exact: float):
    tol = LogHistogram.REL_TOL * (1 + 1e-9) * abs(exact) + LogHistogram.MIN_ABS
    assert abs(got - exact) <= tol, (got, exact)


def _spread_values(seed: int, n: int) -> torch.Tensor:
    """Log-ratio-like values over 12 decades, both signs, some exact zeros."""
    g = torch.Generator().manual_seed(seed)
    magnitude = 10 ** (torch.rand(n, generator=g, dtype=torch.float64) * 12 - 9)  # 1e-9 .. 1e3
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    values = sign * magnitude
    values[torch.rand(n, generator=g) < 0.05] = 0.0
    return values


@pytest.mark.parametrize("seed", range(5))
def test_percentiles_match_float64_nearest_rank_within_resolution(seed):
    g = torch.Generator().manual_seed(100 + seed)
    values = _spread_values(seed, 20_000).reshape(200, 100)
    mask = torch.rand(200, 100, generator=g) < 0.7
    garbage = torch.where(mask, values, torch.tensor(math.nan, dtype=torch.float64))
    m = Metrics()
    for rows in torch.arange(200).tensor_split(7):  # merged over uneven micro-batches
        part = Metrics()
        part.add_percentiles("d", garbage[rows], mask[rows])
        m.merge(part)
    out = m.to_dict()
    assert set(out) == {percentile_key("d", p) for p in PERCENTILES}
    for pct in PERCENTILES:
        _assert_within_resolution(out[percentile_key("d", pct)], _nearest_rank(values[mask], pct))


def test_percentiles_of_a_narrow_distribution_and_the_bounds():
    # a float32-sized log-ratio spread near zero (step 0), and values beyond MAX_ABS saturating
    values = torch.tensor([3e-7, -2e-7, 1e-7, 5e-8, 0.0] * 200, dtype=torch.float64)
    m = Metrics()
    m.add_percentiles("d", values, torch.ones_like(values, dtype=torch.bool))
    for pct in PERCENTILES:
        _assert_within_resolution(m.to_dict()[percentile_key("d", pct)], _nearest_rank(values, pct))
    m = Metrics()
    m.add_percentiles("d", torch.tensor([-1e6, 1e6, 2.0]), torch.ones(3, dtype=torch.bool))
    out = m.to_dict()
    assert out["d_p0.1"] == -LogHistogram.MAX_ABS and out["d_p99.9"] == LogHistogram.MAX_ABS


def test_empty_percentiles_report_nan_and_keep_their_kind():
    m = Metrics()
    m.add_percentiles("d", torch.ones(4), torch.zeros(4, dtype=torch.bool))
    assert all(math.isnan(v) for v in m.to_dict().values()) and len(m.to_dict()) == len(PERCENTILES)
    with pytest.raises(ValueError, match="'d' is already a percentiles metric"):
        m.add_mean("d", 1.0, 1)


def _percentile_worker(rank, world_size):
    values = _spread_values(7, 3000)
    shard = values.tensor_split(world_size)[rank]
    m = Metrics()
    m.add_percentiles("d", shard, torch.ones_like(shard, dtype=torch.bool))
    if rank == 1:  # a name only one rank has: the other contributes an empty histogram
        m.add_percentiles("only_rank1", shard, torch.ones_like(shard, dtype=torch.bool))
    m.all_reduce()
    return m.to_dict()


@pytest.mark.slow
def test_percentiles_over_two_gloo_processes_equal_one_process():
    values = _spread_values(7, 3000)
    one = Metrics()
    one.add_percentiles("d", values, torch.ones_like(values, dtype=torch.bool))
    half = values.tensor_split(2)[1]
    rank1 = Metrics()
    rank1.add_percentiles("only_rank1", half, torch.ones_like(half, dtype=torch.bool))
    expected = {**one.to_dict(), **rank1.to_dict()}
    for result in run_gloo(2, _percentile_worker):
        assert result == expected  # histogram counts add exactly: bit-identical percentiles
