"""Training metrics that reduce correctly across micro-batches and ranks.

A metric is one of four kinds, fixed by the first call that names it:

- mean: kept as (value_sum, count); merging adds both, so the result is the weighted mean over
  every token / sequence seen, whatever the micro-batch split or data-parallel size;
- min / max: kept as a running extreme;
- percentiles: kept as a histogram of counts (`LogHistogram`); merging adds the counts, so the
  percentiles are over every value of the global batch (no sampling), at a fixed resolution: a
  reported percentile is within 0.5% (relative) of the exact nearest-rank value, or within 1e-9 of
  it when that value is smaller than 1e-9 in magnitude (see `LogHistogram`).

Values may be python numbers or 0-dim tensors (any device; they are detached and kept in float64,
and nothing is moved to the host until `to_dict`, so adding metrics never synchronises a GPU).

The helpers at the bottom compute the statistics `policy_loss` and the trainer log.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from gmpo_megatron.algo.advantages import group_index, group_reward_spread

__all__ = [
    "Metrics",
    "LogHistogram",
    "PERCENTILES",
    "add_masked_stats",
    "response_length_stats",
    "all_equal_reward_groups",
]

_KINDS = ("mean", "min", "max", "percentiles")

PERCENTILES = (0.1, 1.0, 99.0, 99.9)
"""The percentiles every `add_percentiles` metric reports, as `{name}_p0.1`, `_p1`, `_p99`, `_p99.9`."""


def percentile_key(name: str, pct: float) -> str:
    return f"{name}_p{pct:g}"


class LogHistogram:
    """A signed, log-spaced histogram: exact counts, bounded value resolution.

    Bins, in increasing value: one overflow bin for x <= -MAX_ABS, NUM_SIDE bins for negative x,
    one zero bin for |x| < MIN_ABS, NUM_SIDE bins for positive x, one overflow bin for x >= MAX_ABS.
    A side bin k holds MIN_ABS * RATIO**k <= |x| < MIN_ABS * RATIO**(k+1) and reports the
    geometric middle MIN_ABS * RATIO**(k + 1/2), so the reported value is within
    sqrt(RATIO) - 1 = 0.4988% (relative) of any value in the bin. The zero bin reports 0 (absolute
    error < MIN_ABS), the overflow bins saturate at +-MAX_ABS. Counts are float64: exact below 2**53.
    """

    RATIO = 1.01
    MIN_ABS = 1e-9
    MAX_ABS = 1e4
    NUM_SIDE = math.ceil(math.log(MAX_ABS / MIN_ABS) / math.log(RATIO))  # 3008
    NUM_BINS = 2 * NUM_SIDE + 3
    REL_TOL = math.sqrt(RATIO) - 1

    @classmethod
    def counts(cls, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Histogram `[NUM_BINS]` float64 of `values` where `mask` is true (same shapes; positions
        outside the mask, inf/nan included, are never read). Stays on the values' device."""
        x = torch.where(mask.bool(), values.detach().to(torch.float64), 0.0).reshape(-1)
        a = x.abs()
        k = torch.floor(torch.log(a.clamp(min=cls.MIN_ABS) / cls.MIN_ABS) / math.log(cls.RATIO))
        k = k.clamp(0, cls.NUM_SIDE - 1).long()
        zero, side = cls.NUM_SIDE + 1, torch.where(x > 0, cls.NUM_SIDE + 2 + k, cls.NUM_SIDE - k)
        index = torch.where(a < cls.MIN_ABS, zero, side)
        index = torch.where(a >= cls.MAX_ABS, torch.where(x > 0, cls.NUM_BINS - 1, 0), index)
        weight = mask.reshape(-1).to(torch.float64)
        return torch.zeros(cls.NUM_BINS, dtype=torch.float64, device=x.device).index_add_(0, index, weight)

    @classmethod
    def bin_values(cls) -> torch.Tensor:
        """The value each bin reports, `[NUM_BINS]` float64, increasing."""
        middle = cls.MIN_ABS * cls.RATIO ** (torch.arange(cls.NUM_SIDE, dtype=torch.float64) + 0.5)
        return torch.cat([torch.tensor([-cls.MAX_ABS], dtype=torch.float64), -middle.flip(0),
                          torch.zeros(1, dtype=torch.float64), middle,
                          torch.tensor([cls.MAX_ABS], dtype=torch.float64)])

    @classmethod
    def percentile(cls, counts: torch.Tensor, pct: float) -> float:
        """Nearest-rank percentile: the value of the bin holding the ceil(pct/100 * N)-th smallest
        value (at least the first); nan for an empty histogram."""
        counts = counts.detach().to("cpu", torch.float64)
        total = float(counts.sum())
        if total == 0:
            return math.nan
        rank = max(1, math.ceil(pct / 100 * total))
        index = int(torch.searchsorted(counts.cumsum(0), torch.tensor(float(rank), dtype=torch.float64)))
        return float(cls.bin_values()[min(index, cls.NUM_BINS - 1)])


def _scalar(value: torch.Tensor | float, name: str) -> torch.Tensor | float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"metric {name!r}: expected a scalar, got a tensor of shape {tuple(value.shape)}; "
                "reduce it first (e.g. .sum() for a value_sum)"
            )
        return value.detach().reshape(()).to(torch.float64)
    return float(value)


def _minimum(a, b):
    if isinstance(a, float) and isinstance(b, float):
        return min(a, b)
    return torch.minimum(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64))


def _maximum(a, b):
    if isinstance(a, float) and isinstance(b, float):
        return max(a, b)
    return torch.maximum(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64))


class Metrics:
    """Mergeable, all-reducible metrics: weighted means, mins and maxes.

    `to_dict()` reports a mean whose count is 0 (nothing seen) as nan, and a min still at +inf or
    a max still at -inf (the identities used for "nothing seen") as nan as well; the key is kept
    so that logged series keep the same columns every step.
    """

    def __init__(self) -> None:
        self._sum: dict[str, torch.Tensor | float] = {}
        self._count: dict[str, torch.Tensor | float] = {}
        self._min: dict[str, torch.Tensor | float] = {}
        self._max: dict[str, torch.Tensor | float] = {}
        self._hist: dict[str, torch.Tensor] = {}

    def _claim(self, name: str, kind: str) -> None:
        tables = (("mean", self._sum), ("min", self._min), ("max", self._max), ("percentiles", self._hist))
        for other, table in tables:
            if other != kind and name in table:
                raise ValueError(
                    f"metric {name!r} is already a {other} metric; it cannot also be a {kind} "
                    f"metric (use a different name, e.g. {name + '_' + kind!r})"
                )

    def add_mean(self, name: str, value_sum: torch.Tensor | float, count: torch.Tensor | float) -> None:
        """Accumulate `value_sum` over `count` elements into the mean metric `name`."""
        self._claim(name, "mean")
        value_sum, count = _scalar(value_sum, name), _scalar(count, name)
        self._sum[name] = self._sum.get(name, 0.0) + value_sum
        self._count[name] = self._count.get(name, 0.0) + count

    def add_min(self, name: str, value: torch.Tensor | float) -> None:
        self._claim(name, "min")
        value = _scalar(value, name)
        self._min[name] = value if name not in self._min else _minimum(self._min[name], value)

    def add_max(self, name: str, value: torch.Tensor | float) -> None:
        self._claim(name, "max")
        value = _scalar(value, name)
        self._max[name] = value if name not in self._max else _maximum(self._max[name], value)

    def add_percentiles(self, name: str, values: torch.Tensor, mask: torch.Tensor) -> None:
        """Count `values` where `mask` is true into the percentile metric `name`, reported as
        `{name}_p0.1|_p1|_p99|_p99.9` (PERCENTILES) at LogHistogram's resolution."""
        self._claim(name, "percentiles")
        self._add_histogram(name, LogHistogram.counts(values, mask))

    def _add_histogram(self, name: str, counts: torch.Tensor) -> None:
        self._hist[name] = counts if name not in self._hist else self._hist[name] + counts.to(self._hist[name])

    def merge(self, other: "Metrics") -> None:
        """Accumulate `other` (e.g. the next micro-batch's metrics) into this one."""
        for name in other._sum:
            self.add_mean(name, other._sum[name], other._count[name])
        for name, value in other._min.items():
            self.add_min(name, value)
        for name, value in other._max.items():
            self.add_max(name, value)
        for name, counts in other._hist.items():
            self._claim(name, "percentiles")
            self._add_histogram(name, counts)

    def all_reduce(self, group: dist.ProcessGroup | None = None) -> None:
        """Reduce over `group` in place: SUM of sums, counts and histograms, MIN of mins, MAX of maxes.

        A no-op when torch.distributed is not initialised. Every rank of the group must call it
        (it is a collective). Ranks may hold different metric names: the union is reduced, a rank
        that lacks a name contributes the identity (0 / +inf / -inf). Call it once per set of
        values: a second call would count every rank's contribution again.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        names = (sorted(self._sum), sorted(self._min), sorted(self._max), sorted(self._hist))
        gathered: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, names, group=group)
        mean_names, min_names, max_names, hist_names = (
            sorted(set().union(*(g[k] for g in gathered))) for k in range(4)
        )
        device = torch.device("cpu")
        if "nccl" in str(dist.get_backend(group)).lower():
            device = torch.device("cuda", torch.cuda.current_device())

        def pack(table, keys, identity):
            values = [torch.as_tensor(table.get(k, identity), dtype=torch.float64).to(device) for k in keys]
            return torch.stack(values) if values else torch.zeros(0, dtype=torch.float64, device=device)

        sums = torch.cat([pack(self._sum, mean_names, 0.0), pack(self._count, mean_names, 0.0)])
        mins = pack(self._min, min_names, math.inf)
        maxs = pack(self._max, max_names, -math.inf)
        empty = torch.zeros(LogHistogram.NUM_BINS, dtype=torch.float64)
        hists = torch.stack([self._hist.get(k, empty).to(device) for k in hist_names]) if hist_names else (
            torch.zeros(0, LogHistogram.NUM_BINS, dtype=torch.float64, device=device))
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(hists, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(mins, op=dist.ReduceOp.MIN, group=group)
        dist.all_reduce(maxs, op=dist.ReduceOp.MAX, group=group)
        n = len(mean_names)
        self._sum = {k: sums[i] for i, k in enumerate(mean_names)}
        self._count = {k: sums[n + i] for i, k in enumerate(mean_names)}
        self._min = {k: mins[i] for i, k in enumerate(min_names)}
        self._max = {k: maxs[i] for i, k in enumerate(max_names)}
        self._hist = {k: hists[i] for i, k in enumerate(hist_names)}

    def to_dict(self) -> dict[str, float]:
        """Plain floats: means as sum/count (nan when count is 0), mins and maxes (nan if unseen),
        `{name}_p{pct}` for each of PERCENTILES (nan when no value was counted)."""
        out: dict[str, float] = {}
        for name in self._sum:
            total, count = float(self._sum[name]), float(self._count[name])
            out[name] = total / count if count != 0 else math.nan
        for name, value in self._min.items():
            out[name] = float(value) if float(value) != math.inf else math.nan
        for name, value in self._max.items():
            out[name] = float(value) if float(value) != -math.inf else math.nan
        for name, counts in self._hist.items():
            for pct in PERCENTILES:
                out[percentile_key(name, pct)] = LogHistogram.percentile(counts, pct)
        return dict(sorted(out.items()))

    def __repr__(self) -> str:
        return f"Metrics({self.to_dict()})"


@torch.no_grad()
def add_masked_stats(
    metrics: Metrics,
    name: str,
    values: torch.Tensor,
    mask: torch.Tensor,
    stats: tuple[str, ...] = ("mean", "min", "max"),
) -> None:
    """Add `{name}_mean|_min|_max` of `values` over the positions where `mask` is true.

    `values` and `mask` have the same shape (`[B, T]` or `[B]`). Positions outside the mask may hold
    anything, inf and nan included: they are replaced before reducing. With no position selected
    the mean gets count 0 and min/max their identities (reported as nan).
    """
    mask = mask.bool()
    values = values.detach().to(torch.float64)
    for stat in stats:
        if stat == "mean":
            metrics.add_mean(f"{name}_mean", torch.where(mask, values, 0.0).sum(), mask.sum())
        elif stat == "min":
            metrics.add_min(f"{name}_min", torch.where(mask, values, math.inf).min())
        elif stat == "max":
            metrics.add_max(f"{name}_max", torch.where(mask, values, -math.inf).max())
        else:
            raise ValueError(f"unknown statistic {stat!r}; allowed: 'mean', 'min', 'max'")


@torch.no_grad()
def response_length_stats(response_mask: torch.Tensor, metrics: Metrics | None = None) -> Metrics:
    """`response_len_mean|_min|_max` over sequences with at least one response token.

    `response_mask` is `[B, T]`; rows without any response token (padding rows) are not sequences.
    Returns `metrics` (a new Metrics if None) with the three entries added.
    """
    metrics = Metrics() if metrics is None else metrics
    lengths = response_mask.bool().sum(-1)
    add_masked_stats(metrics, "response_len", lengths, lengths > 0)
    return metrics


@torch.no_grad()
def all_equal_reward_groups(rewards: torch.Tensor, group_ids: torch.Tensor | int) -> int:
    """Number of groups whose rewards are all equal (they carry no GRPO-family learning signal).

    `rewards` `[N]`, `group_ids` `[N]` (any integer ids) or an int group size (consecutive groups).
    """
    index, num_groups = group_index(group_ids, rewards.shape[0])
    return int((group_reward_spread(rewards, index, num_groups) == 0).sum())
