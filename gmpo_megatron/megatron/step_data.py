"""The step's data between ranks, as tensors: rank 0's rollout batch to the ranks that train on
it, and old log-probs (and R2 routes) from the rank that computed them to the ranks that need them.

Who needs what. Every rank holds the batch's ``BatchShape`` (lengths only, broadcast) and so
computes every data-parallel rank's micro-batch plans (old-log-prob pass and every update
mini-batch; ``micro_batches.py``). DP rank ``d`` needs exactly the samples of its own plans
(``needed_samples``); every rank of one DP replica (its TP / PP / CP / EP positions: one dense
DP rank) needs the same samples.

Who sends to whom (``distribute``):

1. global rank 0 (the rollout engine's rank, replica 0's first rank) sends each other replica's
   samples, ``RolloutBatch.select(needs[d])``, as a few flat tensors to that replica's first rank
   (point-to-point);
2. each replica's first rank broadcasts them inside its replica (the model-parallel group at
   CP 1: TP x PP ranks of one DP rank).

Rank 0 sends each sample once per DP replica that trains on it (about ``1 + ppo_epochs`` times
in all, for any DP size), never the whole batch to everyone.

Old log-probs (``exchange_old_log_probs``): the last pipeline stage of DP rank ``d`` computes
them for its old-pass share; each update needs them for its own samples, so every pair of DP
ranks swaps exactly the samples one computed and the other trains on (point-to-point within the
DP group, one flat float32 tensor per pair). R2's per-sequence routes move the same way
(``exchange_sequence_routes``), on every pipeline stage.

Backends: gloo on CPU, NCCL on GPU (tensors go through ``device``); the batch itself is kept on
the CPU, where micro-batches are built, and each micro-batch is moved to the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gmpo_megatron.rollout.batch import BatchShape, RolloutBatch


def needed_samples(plans: Sequence[Sequence[Sequence[Sequence[int]]]], dp_size: int) -> list[list[int]]:
    """Per DP rank, the sorted samples of its micro-batches over ``plans`` (each plan: per DP rank
    a list of micro-batches, each a list of sample numbers)."""
    needs: list[set[int]] = [set() for _ in range(dp_size)]
    for plan in plans:
        for rank, micro_batches in enumerate(plan):
            for micro_batch in micro_batches:
                needs[rank].update(micro_batch)
    return [sorted(n) for n in needs]


def flat_samples(plan: Sequence[Sequence[Sequence[int]]]) -> list[list[int]]:
    """Per DP rank, the sorted samples of one plan."""
    return needed_samples([plan], len(plan))


@dataclass(frozen=True)
class DataGroups:
    """The ranks the step's data moves between, from this rank's point of view."""

    dp_rank: int
    dp_size: int
    leaders: tuple[int, ...]  # global rank of each DP replica's first rank (replica 0: rank 0)
    replica_ranks: tuple[int, ...]  # the global ranks of this rank's replica (same DP rank)
    replica_group: object  # their process group; None when the replica is one rank
    dp_ranks: tuple[int, ...]  # this rank's DP group (same model-parallel position), by DP rank
    dp_group: object
    device: torch.device


def data_groups(device: torch.device) -> DataGroups:
    """Collective over all ranks (once, after ``init_distributed``)."""
    from megatron.core import parallel_state as ps

    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return DataGroups(0, 1, (0,), (0,), None, (0,), None, device)
    mine = torch.tensor([dp_rank], dtype=torch.long, device=device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    dp_of = [int(t) for t in every]
    replicas = [tuple(r for r in range(world) if dp_of[r] == d) for d in range(dp_size)]
    me = dist.get_rank()
    own = replicas[dp_rank]
    if len(own) == 1:
        group = None
    elif ps.get_context_parallel_world_size() == 1:
        group = ps.get_model_parallel_group()  # TP x PP: every rank of one dense DP rank
        if tuple(sorted(dist.get_process_group_ranks(group))) != own:
            raise RuntimeError(f"rank {me}: Megatron's model-parallel group "
                               f"{sorted(dist.get_process_group_ranks(group))} is not the ranks of DP "
                               f"rank {dp_rank} {list(own)}; the step-data layout assumes Megatron's "
                               "default rank order (tp-cp-ep-dp-pp)")
    else:  # TP x CP x PP has no Megatron group: one of our own per replica (collective, in order)
        group = None
        for ranks in replicas:
            made = dist.new_group(list(ranks))
            if ranks == own:
                group = made
    dp_group = ps.get_data_parallel_group()
    return DataGroups(dp_rank, dp_size, tuple(r[0] for r in replicas), own, group,
                      tuple(dist.get_process_group_ranks(dp_group)), dp_group, device)


def _swap(sends: Sequence[tuple[int, torch.Tensor]], recvs: Sequence[tuple[int, torch.Tensor]],
          group) -> None:
    """Point-to-point: each ``(peer, tensor)`` of ``sends`` to global rank ``peer``, each of
    ``recvs`` filled from its peer (sizes agreed in advance, empty tensors are not sent; several
    tensors between one pair match in order)."""
    ops = [dist.P2POp(dist.isend, t, peer, group) for peer, t in sends if t.numel()]
    ops += [dist.P2POp(dist.irecv, t, peer, group) for peer, t in recvs if t.numel()]
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()


def _empty(specs, device) -> list[torch.Tensor]:
    return [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in specs]


def distribute(batch: RolloutBatch | None, shape: BatchShape, needs: Sequence[Sequence[int]],
               groups: DataGroups) -> RolloutBatch:
    """Collective over all ranks: this rank's samples ``needs[dp_rank]`` of the batch that global
    rank 0 holds (``batch``, None elsewhere), as a CPU ``RolloutBatch`` (module docstring)."""
    mine = list(needs[groups.dp_rank])
    if groups.dp_size == 1 and groups.replica_group is None:
        return batch.select(mine)
    me, device = dist.get_rank(), groups.device
    tensors = None
    if me == 0:
        for d in range(1, groups.dp_size):  # one replica at a time: one replica's copy in flight
            wire = [t.to(device) for t in batch.select(needs[d]).wire_tensors()]
            _swap([(groups.leaders[d], t) for t in wire], [], None)
        tensors = [t.to(device) for t in batch.select(mine).wire_tensors()]
    elif me == groups.leaders[groups.dp_rank]:
        tensors = _empty(RolloutBatch.wire_specs(shape, mine), device)
        _swap([], [(0, t) for t in tensors], None)
    if groups.replica_group is not None:
        if tensors is None:
            tensors = _empty(RolloutBatch.wire_specs(shape, mine), device)
        for t in tensors:
            if t.numel():
                dist.broadcast(t, src=groups.leaders[groups.dp_rank], group=groups.replica_group)
    return RolloutBatch.from_wire(shape, mine, [t.cpu() for t in tensors])


def _pairs(owned: Sequence[Sequence[int]], needs: Sequence[Sequence[int]], rank: int):
    """For each other DP rank p: (samples this rank sends to p, samples it receives from p)."""
    mine, wanted = set(owned[rank]), set(needs[rank])
    for peer in range(len(owned)):
        if peer != rank:
            yield peer, sorted(mine & set(needs[peer])), sorted(wanted & set(owned[peer]))


def exchange_old_log_probs(batch: RolloutBatch, owned: Sequence[Sequence[int]], needs: Sequence[Sequence[int]],
                           groups: DataGroups) -> None:
    """Collective over the DP group (last pipeline stage): fill ``batch.old_log_probs`` for the
    samples ``needs[dp_rank]`` from the DP ranks that computed them (``owned[p]``: the samples of
    DP rank p's old-log-prob pass)."""
    if groups.dp_size == 1:
        return
    sends, recvs, into = [], [], []
    for peer, send, recv in _pairs(owned, needs, groups.dp_rank):
        rank = groups.dp_ranks[peer]
        sends.append((rank, batch.sample_responses(batch.old_log_probs, send).to(groups.device)))
        size = int(batch.shape.response_lengths[torch.as_tensor(recv, dtype=torch.long)].sum()) if recv else 0
        values = torch.empty(size, dtype=torch.float32, device=groups.device)
        recvs.append((rank, values))
        into.append((recv, values))
    _swap(sends, recvs, groups.dp_group)
    for recv, values in into:
        if recv:
            batch.set_sample_responses(batch.old_log_probs, recv, values.cpu())


def exchange_sequence_routes(routes: dict[int, dict[int, torch.Tensor]], shape: BatchShape,
                             owned: Sequence[Sequence[int]], needs: Sequence[Sequence[int]],
                             layers: Sequence[int], top_k: int, dtype: torch.dtype,
                             groups: DataGroups) -> dict[int, dict[int, torch.Tensor]]:
    """Collective over the DP group (each pipeline stage): R2's per-sequence routes
    ``{sample: {layer: [length, k]}}`` of this rank's old-pass samples, completed with those of
    ``needs[dp_rank]`` from the ranks that recorded them. ``layers``: this stage's MoE layers."""
    if groups.dp_size == 1:
        return routes
    layers = list(layers)
    out = {i: routes[i] for i in needs[groups.dp_rank] if i in routes}
    if not layers:
        out.update({i: {} for i in needs[groups.dp_rank]})
        return out
    sends, recvs, into = [], [], []
    for peer, send, recv in _pairs(owned, needs, groups.dp_rank):
        rank = groups.dp_ranks[peer]
        if send:
            sends.append((rank, torch.cat([torch.stack([routes[i][layer] for layer in layers], dim=1)
                                           for i in send]).to(dtype=dtype, device=groups.device)))
        count = int(shape.lengths[torch.as_tensor(recv, dtype=torch.long)].sum()) if recv else 0
        block = torch.empty((count, len(layers), top_k), dtype=dtype, device=groups.device)
        recvs.append((rank, block))
        into.append((recv, block))
    _swap(sends, recvs, groups.dp_group)
    for recv, block in into:
        block = block.cpu()
        start = 0
        for i in recv:
            n = int(shape.lengths[i])
            out[i] = {layer: block[start:start + n, j] for j, layer in enumerate(layers)}
            start += n
    return out
