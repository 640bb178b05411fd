"""Per-sequence routes under context parallelism (``sequence_routes.py``): laid out at a CP rank's
2*CP-layout positions they are exactly that rank's rows of the unsplit layout (also under sequence
parallelism), and ``split_routes`` over the CP group gives back every sequence's routes."""

from __future__ import annotations

import datetime
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gmpo_megatron.algo.context_parallel import cp_chunk_positions
from gmpo_megatron.megatron.sequence_routes import lay_out_routes, split_routes

LAYERS, TOP_K = [0, 2], 2
SHAPE = (1, 16)  # one packed row of 16 tokens: CP2 -> 8 per rank, 4 per rank and TP rank at SP2
SPANS = [(0, 0, 7), (0, 7, 5), (0, 12, 3)]  # the last token is tail padding


def _sequences():
    g = torch.Generator().manual_seed(11)
    # each sequence's routes cover all but its last position (as an engine's R3 routes do)
    return [{layer: torch.randint(0, 8, (n - 1, TOP_K), generator=g) for layer in LAYERS}
            for _, _, n in SPANS]


@pytest.mark.parametrize("tp_size", [1, 2])
def test_cp_layout_is_the_unsplit_layout_at_the_ranks_positions(tp_size):
    sequences = _sequences()
    for cp_rank in range(2):
        positions = cp_chunk_positions(SHAPE[1], 2, cp_rank)
        for tp_rank in range(tp_size):
            full, full_fresh = lay_out_routes(sequences, SPANS, SHAPE, LAYERS, TOP_K)
            routes, fresh = lay_out_routes(sequences, SPANS, SHAPE, LAYERS, TOP_K, tp_rank, tp_size,
                                           cp_positions=positions)
            shard = positions.view(tp_size, -1)[tp_rank]  # SP splits the rank's part again
            assert torch.equal(fresh, full_fresh[shard])
            for layer in LAYERS:
                assert torch.equal(routes[layer], full[layer][shard])


def _worker(rank, world_size, store, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        positions = cp_chunk_positions(SHAPE[1], world_size, rank)
        routes, _ = lay_out_routes(_sequences(), SPANS, SHAPE, LAYERS, TOP_K, cp_positions=positions)
        back = split_routes(routes, SPANS, SHAPE, cp_group=dist.group.WORLD)
        torch.save(back, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_split_over_the_cp_group_gives_back_every_sequence():
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(2, os.path.join(out_dir, "store"), out_dir), nprocs=2, join=True)
        results = [torch.load(os.path.join(out_dir, f"{r}.pt")) for r in range(2)]
    for back in results:  # both CP ranks get the whole sequences
        for sequence, got, (_, _, n) in zip(_sequences(), back, SPANS):
            for layer in LAYERS:
                assert torch.equal(got[layer][:n - 1], sequence[layer])
                assert got[layer].shape == (n, TOP_K)
