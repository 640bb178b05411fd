"""One step's rollouts as a few flat tensors: what the trainer keeps, moves and batches.

A batch of ``N`` samples (the step's samples are numbered 0..N-1 in rollout order, prompt-major)
is described in two parts:

- ``BatchShape``, which every rank holds: per-sample prompt and response lengths (and R3 route
  counts). It is enough to plan micro-batches and to size every transfer, so it is the only part
  broadcast to all ranks (``[3, N]`` int64).
- ``RolloutBatch``: the data of some of those samples (all of them on global rank 0, a
  data-parallel rank's share elsewhere), ragged rows concatenated:

  ========================= ====================== ===============================================
  tokens                    ``[sum length]`` int32  prompt then response ids of each sample
  rollout_log_probs         ``[sum response]`` f32  the engine's log-prob of each response token
  old_log_probs             ``[sum response]`` f32  the trainer's, filled by the old-log-prob pass
  rewards, advantages       ``[n]`` float64
  groups                    ``[n]`` int64           advantage group (prompt) of each sample
  finish_reasons            ``[n]`` int8            index into ``FINISH_REASONS``
  routes (R3, or None)      ``[sum count, L, k]``   the engine's experts per position, layers
                                                    ``route_layers`` (uint8 / int16 ids)
  ========================= ====================== ===============================================

  ``sample_index [n]`` names the samples a batch holds, in row order.

Pure torch (+ numpy for the one conversion from the engine's Python lists); no communication.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

FINISH_REASONS = ("stop", "length")


def exclusive_cumsum(counts: torch.Tensor) -> torch.Tensor:
    """``[n]`` -> ``[n]`` start of each row: ``0, c0, c0 + c1, ...`` (int64)."""
    out = torch.zeros_like(counts, dtype=torch.long)
    if counts.numel() > 1:
        torch.cumsum(counts[:-1], 0, out=out[1:])
    return out


def ragged_index(starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Flat positions ``[starts[0], starts[0] + counts[0]), [starts[1], ...), ...`` concatenated
    (int64 ``[sum counts]``): the gather index of a ragged selection, without a Python loop."""
    counts = counts.long()
    total = int(counts.sum())
    within = torch.arange(total) - torch.repeat_interleave(exclusive_cumsum(counts), counts, output_size=total)
    return torch.repeat_interleave(starts.long(), counts, output_size=total) + within


def ragged_runs(starts: torch.Tensor | Sequence[int], counts: torch.Tensor | Sequence[int]) -> list[list[int]]:
    """The ``[start, count]`` runs of a ragged selection with adjacent rows merged (a sorted
    selection from a batch is mostly a few long runs); empty rows are dropped."""
    starts = starts.tolist() if isinstance(starts, torch.Tensor) else list(starts)
    counts = counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)
    runs: list[list[int]] = []
    for start, count in zip(starts, counts):
        if count <= 0:
            continue
        if runs and runs[-1][0] + runs[-1][1] == start:
            runs[-1][1] += count
        else:
            runs.append([start, count])
    return runs


def ragged_gather(values: torch.Tensor, starts, counts) -> torch.Tensor:
    """``values[ragged_index(starts, counts)]`` as slice copies: the bytes are copied once and no
    int64 index of the selection's size is built (which cost more than the copy itself)."""
    runs = ragged_runs(starts, counts)
    if not runs:
        return values.new_empty((0, *values.shape[1:]))
    if len(runs) == 1:
        start, count = runs[0]
        return values[start:start + count].clone()
    return torch.cat([values[start:start + count] for start, count in runs])


def ragged_scatter(dest: torch.Tensor, starts, counts, values: torch.Tensor) -> None:
    """``dest[ragged_index(starts, counts)] = values``, as slice copies."""
    offset = 0
    for start, count in ragged_runs(starts, counts):
        dest[start:start + count] = values[offset:offset + count]
        offset += count
    if offset != values.shape[0]:
        raise ValueError(f"ragged_scatter: {values.shape[0]} values for {offset} positions")


@dataclass(frozen=True)
class BatchShape:
    """What every rank knows of the step's batch (module docstring): lengths per sample."""

    prompt_lengths: torch.Tensor  # [N] int64
    response_lengths: torch.Tensor  # [N] int64
    route_counts: torch.Tensor | None = None  # [N] int64: positions with R3 routes
    route_layers: tuple[int, ...] = ()
    route_top_k: int = 0
    route_dtype: torch.dtype | None = None

    @property
    def num_samples(self) -> int:
        return int(self.prompt_lengths.numel())

    @property
    def lengths(self) -> torch.Tensor:
        return self.prompt_lengths + self.response_lengths

    def to_tensor(self) -> torch.Tensor:
        """``[3, N]`` int64 (prompt lengths, response lengths, route counts or -1)."""
        routes = self.route_counts if self.route_counts is not None else torch.full_like(self.prompt_lengths, -1)
        return torch.stack([self.prompt_lengths, self.response_lengths, routes])

    def header(self) -> tuple:
        """The small rest: (N, route layers, top_k, route dtype name)."""
        dtype = None if self.route_dtype is None else str(self.route_dtype).removeprefix("torch.")
        return self.num_samples, self.route_layers, self.route_top_k, dtype

    @classmethod
    def from_parts(cls, header: tuple, lengths: torch.Tensor) -> BatchShape:
        _, layers, top_k, dtype = header
        lengths = lengths.cpu().long()
        routes = lengths[2] if dtype is not None else None
        return cls(lengths[0].clone(), lengths[1].clone(), None if routes is None else routes.clone(),
                   tuple(layers), top_k, None if dtype is None else getattr(torch, dtype))


@dataclass
class RolloutBatch:
    """Samples ``sample_index`` of a step's batch (module docstring for the fields)."""

    shape: BatchShape
    sample_index: torch.Tensor  # [n] int64, global sample numbers in row order
    tokens: torch.Tensor  # [sum length] int32
    rollout_log_probs: torch.Tensor  # [sum response] float32
    rewards: torch.Tensor  # [n] float64
    advantages: torch.Tensor  # [n] float64
    groups: torch.Tensor  # [n] int64
    finish_reasons: torch.Tensor  # [n] int8
    routes: torch.Tensor | None = None  # [sum count, L, k]
    old_log_probs: torch.Tensor | None = None  # [sum response] float32
    _rows: dict[int, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._rows = {int(s): row for row, s in enumerate(self.sample_index.tolist())}
        # per-row lengths and row starts in the ragged tensors, computed once
        self._prompts = self.shape.prompt_lengths[self.sample_index]
        self._responses = self.shape.response_lengths[self.sample_index]
        self._lengths = self._prompts + self._responses
        self._token_starts = exclusive_cumsum(self._lengths)
        self._response_starts = exclusive_cumsum(self._responses)
        counts = self.shape.route_counts
        self._route_starts = None if counts is None else exclusive_cumsum(counts[self.sample_index])
        n = self.sample_index.numel()
        for name in ("rewards", "advantages", "groups", "finish_reasons"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"RolloutBatch.{name} has shape {tuple(getattr(self, name).shape)}, "
                                 f"expected [{n}]")
        if self.tokens.numel() != int(self.lengths.sum()):
            raise ValueError(f"RolloutBatch.tokens has {self.tokens.numel()} ids, the lengths say "
                             f"{int(self.lengths.sum())}")
        for name in ("rollout_log_probs", "old_log_probs"):
            values = getattr(self, name)
            if values is not None and values.numel() != int(self.response_lengths.sum()):
                raise ValueError(f"RolloutBatch.{name} has {values.numel()} values for "
                                 f"{int(self.response_lengths.sum())} response tokens")

    # -- per-row views of the shape ---------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return int(self.sample_index.numel())

    @property
    def prompt_lengths(self) -> torch.Tensor:
        return self._prompts

    @property
    def response_lengths(self) -> torch.Tensor:
        return self._responses

    @property
    def lengths(self) -> torch.Tensor:
        return self._lengths

    @property
    def token_starts(self) -> torch.Tensor:
        """``[n]`` each row's first position in ``tokens``."""
        return self._token_starts

    @property
    def response_starts(self) -> torch.Tensor:
        """``[n]`` each row's first position in the ``[sum response]`` tensors."""
        return self._response_starts

    @property
    def route_counts(self) -> torch.Tensor | None:
        counts = self.shape.route_counts
        return None if counts is None else counts[self.sample_index]

    def rows(self, samples: Sequence[int]) -> torch.Tensor:
        """Row of each global sample number (KeyError names a sample this batch lacks)."""
        try:
            return torch.tensor([self._rows[int(s)] for s in samples], dtype=torch.long)
        except KeyError as missing:
            raise KeyError(f"sample {missing.args[0]} is not in this batch (it holds "
                           f"{self.num_samples} of {self.shape.num_samples} samples)") from None

    def response_index(self, samples: Sequence[int]) -> torch.Tensor:
        """Flat positions in the ``[sum response]`` tensors of the given samples' responses."""
        rows = self.rows(samples)
        return ragged_index(self._response_starts[rows], self._responses[rows])

    def sample_tokens(self, samples: Sequence[int]) -> torch.Tensor:
        """The given samples' tokens, concatenated (a copy)."""
        rows = self.rows(samples)
        return ragged_gather(self.tokens, self._token_starts[rows], self._lengths[rows])

    def sample_responses(self, values: torch.Tensor, samples: Sequence[int]) -> torch.Tensor:
        """The given samples' entries of a ``[sum response]`` tensor of this batch, concatenated."""
        rows = self.rows(samples)
        return ragged_gather(values, self._response_starts[rows], self._responses[rows])

    def set_sample_responses(self, values: torch.Tensor, samples: Sequence[int], new: torch.Tensor) -> None:
        """Write ``new`` (the given samples' responses, concatenated) into ``values``."""
        rows = self.rows(samples)
        ragged_scatter(values, self._response_starts[rows], self._responses[rows], new)

    def sample_routes(self, sample: int) -> dict[int, torch.Tensor]:
        """R3 routes of one sample as ``{global MoE layer: [count, k]}`` (views, no copy)."""
        if self.routes is None:
            raise ValueError("this batch has no routes (the engine was not asked for routed experts)")
        row = self.rows([sample])[0]
        start = int(self._route_starts[row])
        block = self.routes[start:start + int(self.route_counts[row])]
        return {layer: block[:, j] for j, layer in enumerate(self.shape.route_layers)}

    def store_old_log_probs(self, samples: Sequence[int], log_prob: torch.Tensor) -> None:
        """Write a ``[B, R]`` block of log-probs (row i: sample ``samples[i]``, its first
        response-length entries; the rest is padding) into ``old_log_probs``."""
        if self.old_log_probs is None:
            self.old_log_probs = torch.zeros(int(self.response_lengths.sum()), dtype=torch.float32)
        rows = self.rows(samples)
        block = log_prob[:len(samples)].float().cpu()
        for i, (start, count) in enumerate(zip(self._response_starts[rows].tolist(), self._responses[rows].tolist())):
            self.old_log_probs[start:start + count] = block[i, :count]

    # -- sub-batches and transfers --------------------------------------------------------------
    def select(self, samples: Sequence[int]) -> RolloutBatch:
        """The given samples, in that order, as a new batch (copies)."""
        rows = self.rows(samples)
        routes = None
        if self.routes is not None:
            routes = ragged_gather(self.routes, self._route_starts[rows], self.route_counts[rows])
        old = None if self.old_log_probs is None else self.sample_responses(self.old_log_probs, samples)
        return RolloutBatch(
            self.shape, self.sample_index[rows], self.sample_tokens(samples),
            self.sample_responses(self.rollout_log_probs, samples), self.rewards[rows], self.advantages[rows],
            self.groups[rows], self.finish_reasons[rows], routes=routes, old_log_probs=old)

    def wire_tensors(self) -> list[torch.Tensor]:
        """The tensors that carry this batch between ranks (shapes: ``wire_specs``); lengths
        and sample numbers travel in ``BatchShape`` and the plan, not here."""
        scalars = torch.stack([self.rewards, self.advantages], dim=1)
        labels = torch.stack([self.groups, self.finish_reasons.long()], dim=1)
        out = [self.tokens, self.rollout_log_probs, scalars, labels]
        return out + ([self.routes] if self.routes is not None else [])

    @staticmethod
    def wire_specs(shape: BatchShape, samples: Sequence[int]) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """(shape, dtype) of each of ``wire_tensors()`` for a batch of ``samples`` in ``shape``."""
        index = torch.as_tensor(list(samples), dtype=torch.long)
        n = int(index.numel())
        specs = [((int(shape.lengths[index].sum()),), torch.int32),
                 ((int(shape.response_lengths[index].sum()),), torch.float32),
                 ((n, 2), torch.float64), ((n, 2), torch.int64)]
        if shape.route_counts is not None:
            specs.append(((int(shape.route_counts[index].sum()), len(shape.route_layers), shape.route_top_k),
                          shape.route_dtype))
        return specs

    @classmethod
    def from_wire(cls, shape: BatchShape, samples: Sequence[int], tensors: Sequence[torch.Tensor]) -> RolloutBatch:
        tokens, rollout, scalars, labels = tensors[:4]
        return cls(shape, torch.as_tensor(list(samples), dtype=torch.long), tokens, rollout,
                   scalars[:, 0].contiguous(), scalars[:, 1].contiguous(), labels[:, 0].contiguous(),
                   labels[:, 1].to(torch.int8), routes=tensors[4] if len(tensors) > 4 else None)

    def to(self, device: torch.device | str) -> RolloutBatch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, tokens=move(self.tokens), rollout_log_probs=move(self.rollout_log_probs),
                       rewards=move(self.rewards), advantages=move(self.advantages), groups=move(self.groups),
                       finish_reasons=move(self.finish_reasons), routes=move(self.routes),
                       old_log_probs=move(self.old_log_probs))

    # -- from the engine's output -----------------------------------------------------------------
    @classmethod
    def from_lists(cls, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                   rollout_log_probs: Sequence[Sequence[float]], rewards, advantages, groups,
                   finish_reasons: Sequence[str], routes: Sequence[dict | None] | None = None) -> RolloutBatch:
        """The whole batch (samples 0..N-1) from per-sample Python lists, as engines return them;
        ``routes``: per sample ``{layer: [count, k]}`` (R3) or None. One conversion each."""
        n = len(prompt_ids)
        prompt_lengths = torch.tensor([len(p) for p in prompt_ids], dtype=torch.long)
        response_lengths = torch.tensor([len(r) for r in response_ids], dtype=torch.long)
        if len(response_ids) != n or len(rollout_log_probs) != n or len(finish_reasons) != n:
            raise ValueError("prompt_ids, response_ids, rollout_log_probs and finish_reasons need one "
                             f"entry per sample, got {len(prompt_ids)}, {len(response_ids)}, "
                             f"{len(rollout_log_probs)}, {len(finish_reasons)}")
        bad = [i for i in range(n) if len(rollout_log_probs[i]) != len(response_ids[i])]
        if bad:
            raise ValueError(f"sample {bad[0]} has {len(rollout_log_probs[bad[0]])} rollout log-probs for "
                             f"{len(response_ids[bad[0]])} response tokens")
        total = int((prompt_lengths + response_lengths).sum())
        flat = itertools.chain.from_iterable(itertools.chain(p, r) for p, r in zip(prompt_ids, response_ids))
        try:  # straight into int32 / float32: numpy 2 refuses an id that does not fit
            ids = np.fromiter(flat, dtype=np.int32, count=total)
        except OverflowError as error:
            raise ValueError(f"token ids must be in [0, 2**31): {error}") from None
        if ids.size and ids.min() < 0:
            raise ValueError(f"token ids must be in [0, 2**31), got {ids.min()}")
        tokens = torch.from_numpy(ids)
        rollout = torch.from_numpy(np.fromiter(itertools.chain.from_iterable(rollout_log_probs), dtype=np.float32,
                                               count=int(response_lengths.sum())))
        unknown = sorted({f for f in finish_reasons} - set(FINISH_REASONS))
        if unknown:
            raise ValueError(f"finish reasons {unknown}; known: {list(FINISH_REASONS)}")
        finish = torch.tensor([FINISH_REASONS.index(f) for f in finish_reasons], dtype=torch.int8)
        shape = BatchShape(prompt_lengths, response_lengths)
        packed_routes = None
        if routes is not None and any(r is not None for r in routes):
            packed_routes, shape = _pack_routes(routes, shape)
        return cls(shape, torch.arange(n), tokens, rollout,
                   torch.as_tensor(rewards, dtype=torch.float64).reshape(n),
                   torch.as_tensor(advantages, dtype=torch.float64).reshape(n),
                   torch.as_tensor(groups, dtype=torch.long).reshape(n), finish, routes=packed_routes)


def _pack_routes(routes: Sequence[dict | None], shape: BatchShape) -> tuple[torch.Tensor, BatchShape]:
    missing = [i for i, r in enumerate(routes) if r is None]
    if missing:
        raise ValueError(f"samples {missing[:8]} have no routed experts while others do: the engine "
                         "must return routes for every sample or none")
    layers = tuple(sorted(routes[0]))
    first = routes[0][layers[0]]
    top_k, dtype = int(first.shape[1]), first.dtype
    counts = []
    for i, sample in enumerate(routes):
        if tuple(sorted(sample)) != layers:
            raise ValueError(f"sample {i} has routes for layers {sorted(sample)}, sample 0 for {list(layers)}")
        sizes = {tuple(t.shape) for t in sample.values()}
        if len(sizes) != 1 or next(iter(sizes))[1] != top_k:
            raise ValueError(f"sample {i}: routes need one [count, {top_k}] shape for every layer, got {sizes}")
        counts.append(next(iter(sizes))[0])
    packed = torch.cat([torch.stack([torch.as_tensor(sample[layer]) for layer in layers], dim=1)
                        for sample in routes]).to(dtype)
    return packed, replace(shape, route_counts=torch.tensor(counts, dtype=torch.long), route_layers=layers,
                           route_top_k=top_k, route_dtype=dtype)
