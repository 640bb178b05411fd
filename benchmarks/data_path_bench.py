"""The trainer's per-step data handling, old path against new path, on CPU with gloo at DP 2.

    python benchmarks/data_path_bench.py            # the Qwen3-30B-A3B recipe's batch: 512 x 16
    python benchmarks/data_path_bench.py --scale 0.125   # 64 prompts x 16, a quick run

What a step does with its data, from the engine's output (per-sample Python lists on global rank
0, as ``collect_rollouts`` returns them) to the update micro-batches, without the model: the
old-log-prob pass's output is stood in for by the rollout log-probs of each micro-batch (same
shape, same bytes). Both paths use the recipe's settings (``examples/moe/qwen3_30b_a3b.yaml``:
padded micro-batches of 2 sequences, 16 mini-batches, 1 epoch).

- old (the trainer before this change, re-implemented here faithfully): ``Sample`` objects with
  Python lists, the whole list pickled and broadcast to every rank (``broadcast_object_list``),
  micro-batches built per sample from the lists, old log-probs ``.tolist()``-ed and
  ``all_gather_object``-ed to every rank, update micro-batches rebuilt from the lists;
- new (``gmpo_megatron.rollout.batch`` + ``gmpo_megatron.megatron.step_data``): one
  ``RolloutBatch`` of flat tensors on rank 0, lengths broadcast, each DP rank sent only its
  micro-batches' samples, micro-batches built from the tensors, old log-probs exchanged as
  tensors between the ranks that computed and need them.

Lengths: prompts log-normal (median 256, within [16, 2048]), responses log-normal (median 2048,
sigma 1) cut at 8192 (about 8% reach the cap), seeded. Per path and step: wall seconds (the
slower rank) and the peak resident-memory growth over the step (sampled every 5 ms, the larger
rank). ``copy x``: the new path's time over a plain ``torch.clone`` of the batch's bytes (tokens
int32, rollout and old log-probs float32) on one core: how many memory copies the data path costs;
for the new path split into the one conversion of the engine's Python lists into the batch's
tensors (``RolloutBatch.from_lists``: reading ~50 M Python objects, whatever the layout) and the
rest (scatter, micro-batches, old-log-prob exchange).
"""

from __future__ import annotations

import argparse
import os
import pickle  # noqa: F401  (the old path pickles through broadcast_object_list)
import random
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout without installing the package

PAD = 0


# -- the old path (the trainer before the tensor batch), kept here to compare against -----------
@dataclass
class Sample:
    prompt_ids: list[int]
    response_ids: list[int]
    rollout_log_probs: list[float]
    reward: float
    advantage: float
    group: int
    finish_reason: str
    old_log_probs: list[float] | None = None
    routes: dict | None = None

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def old_loss_inputs(chosen, starts):
    b = len(chosen)
    r = max(len(s.response_ids) for s in chosen)
    logit_index = torch.zeros((b, r), dtype=torch.long)
    targets = torch.zeros((b, r), dtype=torch.long)
    mask = torch.zeros((b, r), dtype=torch.bool)
    old = torch.zeros((b, r), dtype=torch.float32)
    rollout = torch.zeros((b, r), dtype=torch.float32)
    for i, (s, start) in enumerate(zip(chosen, starts)):
        n = len(s.response_ids)
        logit_index[i, :n] = torch.arange(n) + start + len(s.prompt_ids) - 1
        targets[i, :n] = torch.tensor(s.response_ids)
        mask[i, :n] = True
        rollout[i, :n] = torch.tensor(s.rollout_log_probs, dtype=torch.float32)
        if s.old_log_probs is not None:
            old[i, :n] = torch.tensor(s.old_log_probs, dtype=torch.float32)
    return logit_index, targets, mask, old, rollout


def old_model_input_shape(samples, indices, seq_multiple, packed):
    round_up = lambda n: -(-n // seq_multiple) * seq_multiple  # noqa: E731
    if packed:
        return 1, round_up(sum(samples[i].length for i in indices))
    return len(indices), round_up(max(samples[i].length for i in indices))


def old_build_micro_batch(samples, indices, *, pad_id, seq_multiple, packed, min_shape=(0, 0)):
    """The trainer's micro-batch before the tensor batch: (tokens, positions, attention mask,
    logit_index, targets, mask, old, rollout, advantages, spans)."""
    chosen = [samples[i] for i in indices]
    rows, seq = old_model_input_shape(samples, indices, seq_multiple, packed)
    rows, seq = max(rows, min_shape[0]), max(seq, min_shape[1])
    if packed:
        total = seq
        tokens = torch.full((1, total), pad_id, dtype=torch.long)
        positions = torch.zeros((1, total), dtype=torch.long)
        segment = torch.full((total,), -1, dtype=torch.long)
        starts, offset = [], 0
        for i, s in enumerate(chosen):
            tokens[0, offset:offset + s.length] = torch.tensor(s.prompt_ids + s.response_ids)
            positions[0, offset:offset + s.length] = torch.arange(s.length)
            segment[offset:offset + s.length] = i
            starts.append(offset)
            offset += s.length
        pad = segment < 0
        segment[pad] = -1 - torch.arange(int(pad.sum()))
        causal = torch.ones((total, total), dtype=torch.bool).tril()
        visible = causal & (segment[:, None] == segment[None, :])
        attention_mask = (~visible)[None, None]
    else:
        tokens = torch.full((rows, seq), pad_id, dtype=torch.long)
        for row, s in enumerate(chosen):
            tokens[row, :s.length] = torch.tensor(s.prompt_ids + s.response_ids)
        positions = torch.arange(seq).unsqueeze(0).expand(rows, -1).contiguous()
        starts = [row * seq for row in range(len(chosen))]
        attention_mask = None
    logit_index, targets, mask, old, rollout = old_loss_inputs(chosen, starts)
    spans = [(0, start, sm.length) if packed else (row, 0, sm.length)
             for row, (sm, start) in enumerate(zip(chosen, starts))]
    advantages = torch.tensor([s.advantage for s in chosen], dtype=torch.float32)
    return (tokens, positions, attention_mask, logit_index, targets, mask, old, rollout, advantages, spans)


def old_store_old_log_probs(samples, outputs):
    """compute_old_log_probs's tail before the tensor batch: lists, then all_gather_object."""
    local = []
    for log_prob, indices in outputs:
        for row, index in enumerate(indices):
            local.append((index, log_prob[row, :len(samples[index].response_ids)].tolist()))
    if dist.is_initialized() and dist.get_world_size() > 1:
        shares = [None] * dist.get_world_size()
        dist.all_gather_object(shares, local)
        local = [item for share in shares for item in share]
    for index, values in local:
        samples[index].old_log_probs = values


# -- the step, both ways --------------------------------------------------------------------------
def synthetic_rollouts(prompts: int, n: int, max_response: int, seed: int):
    """Per-sample Python lists as an engine returns them (prompt-major groups of n)."""
    rng = np.random.default_rng(seed)
    count = prompts * n
    prompt_len = np.clip(rng.lognormal(np.log(256), 0.7, prompts), 16, 2048).astype(int)
    response_len = np.clip(rng.lognormal(np.log(2048), 1.0, count), 1, max_response).astype(int)
    prompt_ids = [rng.integers(1, 151_000, size=p).tolist() for p in prompt_len]
    out = []
    for i in range(count):
        r = int(response_len[i])
        out.append((prompt_ids[i // n], rng.integers(1, 151_000, size=r).tolist(),
                    (-rng.random(r)).tolist(), float(rng.random() < 0.5), float(rng.normal()), i // n,
                    "stop" if r < max_response else "length"))
    return out


def plan(lengths, indices, dp, micro_batch_size, packed, max_tokens):
    from gmpo_megatron.megatron.micro_batches import plan_micro_batches, plan_packed_micro_batches

    if packed:
        table = {i: int(lengths[i]) for i in indices}
        return [plan_packed_micro_batches(table, indices, r, dp, max_tokens) for r in range(dp)]
    return [plan_micro_batches(indices, r, dp, micro_batch_size) for r in range(dp)]


def mini_batches(num, mini, seed):
    from gmpo_megatron.megatron.micro_batches import split_evenly

    order = list(range(num))
    random.Random(seed).shuffle(order)
    return [m for m in split_evenly(order, mini) if m]


def old_step(rollouts, args, dp_rank, dp):
    rank = dist.get_rank()
    box = [None]
    if rank == 0:
        box = [[Sample(p, r, list(lp), rw, ad, g, f) for p, r, lp, rw, ad, g, f in rollouts]]
    dist.broadcast_object_list(box, src=0)
    samples = box[0]
    lengths = [s.length for s in samples]
    old_plans = plan(lengths, list(range(len(samples))), dp, args.micro_batch_size, args.packing, args.max_tokens)
    outputs = []
    for chunk in old_plans[dp_rank]:
        built = old_build_micro_batch(samples, chunk, pad_id=PAD, seq_multiple=1, packed=args.packing)
        outputs.append((built[7].clone(), chunk))  # the forward's [B, R] log-probs stand-in
    old_store_old_log_probs(samples, outputs)
    checksum = 0.0
    for mini in mini_batches(len(samples), args.mini_batches, 7):
        for chunk in plan(lengths, mini, dp, args.micro_batch_size, args.packing, args.max_tokens)[dp_rank]:
            built = old_build_micro_batch(samples, chunk, pad_id=PAD, seq_multiple=1, packed=args.packing)
            checksum += float(built[6].sum()) + float(built[4].sum())
    return checksum


def new_step(rollouts, args, dp_rank, dp, groups):
    from gmpo_megatron.megatron import step_data
    from gmpo_megatron.megatron.micro_batches import build_micro_batch
    from gmpo_megatron.rollout.batch import BatchShape, RolloutBatch

    rank = dist.get_rank()
    full, convert = None, 0.0
    if rank == 0:
        start = time.perf_counter()
        columns = list(zip(*rollouts))
        full = RolloutBatch.from_lists(columns[0], columns[1], columns[2], columns[3], columns[4], columns[5],
                                       columns[6])
        convert = time.perf_counter() - start
    box = [full.shape.header() if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    lengths = full.shape.to_tensor() if rank == 0 else torch.empty((3, box[0][0]), dtype=torch.long)
    dist.broadcast(lengths, src=0)
    shape = full.shape if rank == 0 else BatchShape.from_parts(box[0], lengths)
    num = shape.num_samples
    all_lengths = shape.lengths.tolist()
    old_plans = plan(all_lengths, list(range(num)), dp, args.micro_batch_size, args.packing, args.max_tokens)
    update_plans = [plan(all_lengths, mini, dp, args.micro_batch_size, args.packing, args.max_tokens)
                    for mini in mini_batches(num, args.mini_batches, 7)]
    owned = step_data.flat_samples(old_plans)
    batch = step_data.distribute(full, shape, step_data.needed_samples([old_plans, *update_plans], dp), groups)
    del full
    cpu = torch.device("cpu")
    for chunk in old_plans[dp_rank]:
        built = build_micro_batch(batch, chunk, pad_id=PAD, seq_multiple=1, device=cpu, packed=args.packing)
        batch.store_old_log_probs(chunk, built.rollout_log_prob.clone())  # the forward's stand-in
    step_data.exchange_old_log_probs(batch, owned, step_data.needed_samples(update_plans, dp), groups)
    checksum = 0.0
    for plans in update_plans:
        for chunk in plans[dp_rank]:
            built = build_micro_batch(batch, chunk, pad_id=PAD, seq_multiple=1, device=cpu, packed=args.packing)
            checksum += float(built.old_log_prob.sum()) + float(built.targets.sum())
    return checksum, convert


class PeakRSS:
    """Peak resident-set growth over a block, sampled from /proc every 5 ms."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self):
        self.base = self.peak = self.rss()
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, self.rss())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())
        self.growth = self.peak - self.base


def worker(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from gmpo_megatron.megatron import step_data
    from gmpo_megatron.megatron.parallel import init_distributed

    layout = init_distributed(seed=0)
    groups = step_data.data_groups(torch.device("cpu"))
    prompts = max(2, round(args.prompts * args.scale))
    rollouts = synthetic_rollouts(prompts, args.n, args.max_response, seed=1) if rank == 0 else None
    results = []
    for path in args.paths:
        for step in range(args.steps):
            dist.barrier()
            with PeakRSS() as memory:
                start = time.perf_counter()
                checksum, convert = ((old_step(rollouts, args, layout.dp_rank, layout.dp), 0.0) if path == "old"
                                     else new_step(rollouts, args, layout.dp_rank, layout.dp, groups))
                seconds = time.perf_counter() - start
            dist.barrier()
            results.append((path, step, seconds, memory.growth, checksum, convert))
    copy = None
    if rank == 0:
        total_tokens = sum(len(r[0]) + len(r[1]) for r in rollouts)
        response_tokens = sum(len(r[1]) for r in rollouts)
        nbytes = 4 * total_tokens + 8 * response_tokens
        source = torch.ones(nbytes, dtype=torch.uint8)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            source.clone()
            times.append(time.perf_counter() - start)
        copy = (nbytes, min(times), len(rollouts), total_tokens)
    queue.put((rank, results, copy))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--max-response", type=int, default=8192)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of --prompts (quick runs)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--mini-batches", type=int, default=16)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--packing", action="store_true", help="packed micro-batches (THD) instead of padded")
    parser.add_argument("--max-tokens", type=int, default=20480, help="packed: token budget per micro-batch")
    parser.add_argument("--paths", nargs="+", default=["old", "new"], choices=["old", "new"])
    args = parser.parse_args()
    world = 2
    queue = mp.get_context("spawn").SimpleQueue()
    port = 29500 + random.Random().randrange(2000)
    context = mp.spawn(worker, args=(world, port, args, queue), nprocs=world, join=False)
    reports = [queue.get() for _ in range(world)]
    context.join()
    reports.sort(key=lambda r: r[0])
    nbytes, copy_s, samples, tokens = reports[0][2]
    print(f"batch: {samples} samples, {tokens / 1e6:.1f} M tokens; tokens int32 + rollout and old "
          f"log-probs float32 = {nbytes / 2**20:.0f} MiB; torch clone of those bytes: {copy_s:.3f} s")
    print(f"{'path':<5} {'step':>4} {'seconds':>9} {'peak MiB':>9} {'copy x':>8} {'of which lists->tensors':>24}")
    by_step = {}
    for rank, results, _ in reports:
        for path, step, seconds, growth, checksum, convert in results:
            entry = by_step.setdefault((path, step), [0.0, 0, [], 0.0])
            entry[0] = max(entry[0], seconds)
            entry[1] = max(entry[1], growth)
            entry[2].append(checksum)
            entry[3] = max(entry[3], convert)
    for (path, step), (seconds, growth, _, convert) in by_step.items():
        split = (f"{convert:>7.3f} s = {convert / copy_s:>5.1f} x, rest {(seconds - convert) / copy_s:>5.1f} x"
                 if path == "new" else "")
        print(f"{path:<5} {step:>4} {seconds:>9.3f} {growth / 2**20:>9.0f} {seconds / copy_s:>8.1f}  {split}")
    for step in range(args.steps):
        if ("old", step) in by_step and ("new", step) in by_step:
            same = by_step[("old", step)][2] == by_step[("new", step)][2]
            print(f"step {step}: old and new micro-batches sum alike on every rank: {same}")


if __name__ == "__main__":
    main()
