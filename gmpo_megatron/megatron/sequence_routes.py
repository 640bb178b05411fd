"""Per-sequence routes <-> micro-batch routes: how R2 survives re-batching and how R3 plugs in.

Micro-batch routes (``RoutingReplay.routes``) are per MoE layer ``[tokens, top_k]`` in the order
the router sees the tokens: Megatron's ``[s, b]`` flattened (token ``t`` of row ``j`` is row
``t * b + j``), and under sequence parallelism only this TP rank's slice of ``s``. Per-sequence
routes are ``{layer: [n, top_k]}`` for a sequence's first ``n`` positions, independent of any
micro-batch: the format that is exchanged across data-parallel ranks and that a rollout engine
returns (R3).

Where a sequence sits in a micro-batch is a *span* ``(row, start, n)``: the sequence is
``tokens[row, start:start + n]`` of the model input ``tokens [b, S]``. Padded micro-batches have
spans ``(i, 0, length_i)``, a packed one (THD: sequences back to back in one row) has
``(0, offset_i, length_i)``.

Under context parallelism a rank's routers see only its 2*CP-layout part of every row
(``cp_batches.py``): its routes are ``[S/CP, b]`` flattened, rows at the positions
``cp_chunk_positions(S, cp, rank)``; spans and shapes stay those of the unsplit micro-batch, and
``split_routes`` (given ``cp_group``) / ``lay_out_routes`` (given ``cp_positions``) convert.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from gmpo_megatron.algo.context_parallel import cp_chunk_positions

Routes = dict[int, torch.Tensor]  # global layer index -> [tokens, top_k] expert ids
Span = tuple[int, int, int]  # (row, start, n): a sequence is tokens[row, start:start + n]


def check_spans(spans: Sequence[Span], shape: tuple[int, int]) -> None:
    """Every span fits the micro-batch ``shape = (b, S)`` and no two overlap."""
    b, seq_len = shape
    taken = torch.zeros(b, seq_len, dtype=torch.bool)
    for row, start, n in spans:
        if not (0 <= row < b and 0 <= start and n > 0 and start + n <= seq_len):
            raise ValueError(f"span (row={row}, start={start}, n={n}) does not fit a micro-batch of "
                             f"shape {tuple(shape)}")
        if taken[row, start:start + n].any():
            raise ValueError(f"span (row={row}, start={start}, n={n}) overlaps another sequence")
        taken[row, start:start + n] = True


def split_routes(routes: Routes, spans: Sequence[Span], shape: tuple[int, int], tp_group=None,
                 name: str = "routes", cp_group=None) -> list[Routes]:
    """One ``{layer: [n, top_k]}`` per span (CPU copies) from a micro-batch's routes. Under
    sequence parallelism pass the TP group, under context parallelism the CP group: the shards
    are all-gathered first (a collective: every rank of the group calls it)."""
    b, seq_len = shape
    check_spans(spans, shape)
    out: list[Routes] = [{} for _ in spans]
    cp = dist.get_world_size(cp_group) if cp_group is not None else 1
    for layer, ids in routes.items():
        if tp_group is not None and dist.get_world_size(tp_group) > 1:
            ids = _all_gather_rows(ids, tp_group)
        if cp > 1:
            ids = _unsplit_context_parallel(ids, b, seq_len, cp_group)
        if ids.shape[0] != seq_len * b:
            raise ValueError(f"{name}, layer {layer}: {ids.shape[0]} routed tokens, but the "
                             f"micro-batch shape {tuple(shape)} has {seq_len * b} (pass tp_group "
                             "under sequence parallelism)")
        grid = ids.cpu().view(seq_len, b, -1)  # router order: [s, b]
        for i, (row, start, n) in enumerate(spans):
            out[i][layer] = grid[start:start + n, row].clone()
    return out


def lay_out_routes(sequences: Sequence[Routes], spans: Sequence[Span], shape: tuple[int, int],
                   layers: Sequence[int], top_k: int, tp_rank: int = 0, tp_size: int = 1,
                   name: str = "routes",
                   cp_positions: torch.Tensor | None = None) -> tuple[Routes, torch.Tensor]:
    """Micro-batch routes of ``layers`` (this TP rank's sequence-parallel slice; with
    ``cp_positions``, of this context-parallel rank's positions of the rows) from per-sequence
    routes placed at ``spans``, and ``fresh_rows [tokens]`` (True where no route was given: padding,
    or positions past a sequence's routes, which must be a prefix of its span)."""
    b, seq_len = shape
    check_spans(spans, shape)
    if len(sequences) != len(spans):
        raise ValueError(f"{name}: {len(sequences)} sequences of routes for {len(spans)} spans")
    if seq_len % tp_size:
        raise ValueError(f"{name}: sequence length {seq_len} is not divisible by tp_size {tp_size} "
                         "(sequence parallelism pads micro-batches to a multiple of tp)")
    fresh = torch.ones(seq_len, b, dtype=torch.bool)
    grids = {layer: torch.zeros(seq_len, b, top_k, dtype=torch.long) for layer in layers}
    for i, (sequence, (row, start, n)) in enumerate(zip(sequences, spans)):
        missing = [layer for layer in layers if layer not in sequence]
        counts = {sequence[layer].shape[0] for layer in layers if layer in sequence}
        if missing or len(counts) > 1 or (counts and max(counts) > n):
            raise ValueError(f"{name}, sequence {i}: needs every MoE layer of this rank (missing "
                             f"{missing}) with one token count <= its length {n} (got {sorted(counts)})")
        m = counts.pop() if counts else 0
        fresh[start:start + m, row] = False
        for layer, grid in grids.items():
            grid[start:start + m, row] = sequence[layer].long()
    if cp_positions is not None:  # this CP rank's rows, in its local order
        cp_positions = cp_positions.cpu()
        fresh = fresh[cp_positions]
        grids = {layer: grid[cp_positions] for layer, grid in grids.items()}
        seq_len = cp_positions.numel()
        if seq_len % tp_size:
            raise ValueError(f"{name}: this CP rank's {seq_len} positions are not divisible by "
                             f"tp_size {tp_size}")
    shard = slice(tp_rank * seq_len // tp_size * b, (tp_rank + 1) * seq_len // tp_size * b)
    routes = {layer: grid.reshape(seq_len * b, -1)[shard] for layer, grid in grids.items()}
    return routes, fresh.reshape(-1)[shard]


def _unsplit_context_parallel(ids: torch.Tensor, b: int, seq_len: int, cp_group) -> torch.Tensor:
    """``[S/CP * b, k]`` routes of every CP rank (2*CP layout) -> ``[S * b, k]`` in row order."""
    cp = dist.get_world_size(cp_group)
    parts = _all_gather_parts(ids, cp_group)
    grid = torch.zeros(seq_len, b, ids.shape[-1], dtype=ids.dtype)
    for rank, part in enumerate(parts):
        grid[cp_chunk_positions(seq_len, cp, rank)] = part.cpu().view(seq_len // cp, b, -1)
    return grid.view(seq_len * b, -1)


def _all_gather_parts(ids: torch.Tensor, group) -> list[torch.Tensor]:
    """Every rank's ``[rows, k]`` (equal rows), in rank order, in ``ids``' dtype; int32 on the wire."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
        else torch.device("cpu")
    local = ids.to(device=device, dtype=torch.int32)
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    return [part.to(ids.dtype) for part in parts]


def _all_gather_rows(ids: torch.Tensor, group) -> torch.Tensor:
    """Concatenate every rank's ``[rows, k]`` (equal rows) in rank order."""
    return torch.cat(_all_gather_parts(ids, group))
