"""Run a function on N local gloo processes (torch.multiprocessing spawn) and collect results.

The function must live at module level in an importable module (the test files here are), take
(rank, world_size, *args) and return something torch.save can write (tensors, numbers, dicts).
"""

from __future__ import annotations

import datetime
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, world_size, store_path, fn, args, out_dir):
    torch.set_num_threads(1)  # N processes share 2 cores
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store_path}",  # a file store: no TCP port to race for
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        torch.save(fn(rank, world_size, *args), os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_gloo(world_size: int, fn, *args) -> list:
    """[fn(rank, world_size, *args) for each rank], computed in `world_size` gloo processes."""
    with tempfile.TemporaryDirectory() as out_dir:
        store_path = os.path.join(out_dir, "store")
        mp.spawn(_entry, args=(world_size, store_path, fn, args, out_dir), nprocs=world_size, join=True)
        return [torch.load(os.path.join(out_dir, f"{r}.pt")) for r in range(world_size)]
