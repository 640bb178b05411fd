"""torchrun worker for test_routing_replay_mp.py (2 gloo processes): routing replay at EP2 and
at TP2 with sequence parallelism. Rank 0 writes a JSON report.

EP2: each rank scores its own samples (its own data-parallel share), records their experts,
splits them per sequence and exchanges them across data-parallel ranks; after the routers move,
each rank replays the *other* rank's samples, and every router must pick exactly the global expert
ids that the other rank recorded. Expert load reduced over the world must count both ranks' tokens.

TP2 + SP: both ranks see the same samples but each router only its sequence shard; the per-sequence
routes gathered over the TP group are identical on both ranks, and a rebatched micro-batch replays
them shard by shard.

    torchrun --nproc_per_node 2 routing_replay_worker.py <report.json>
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

SEQ, ROWS, TOP_K, EXPERTS = 16, 3, 2, 8
LENGTHS = [16, 12, 9]
SPANS = [(row, 0, n) for row, n in enumerate(LENGTHS)]  # padded rows


def _tokens(seed: int) -> torch.Tensor:
    return torch.randint(0, 64, (ROWS, SEQ), generator=torch.Generator().manual_seed(seed))


def _observe(model, seen):
    from gmpo_megatron.megatron.routing_replay import moe_routers

    return [router.register_forward_hook(
        lambda mod, args, out, layer=layer: seen.__setitem__(layer, out[1].detach()))
        for layer, router in moe_routers(model).items()]


def _perturb(model) -> None:
    """The same large move of the router weights on every rank (routers are replicated)."""
    from gmpo_megatron.megatron.routing_replay import moe_routers

    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for router in moe_routers(model).values():
            router.weight.copy_(torch.randn(router.weight.shape, generator=generator))


def _map(ids: torch.Tensor) -> torch.Tensor:
    return torch.zeros(ids.shape[0], EXPERTS, dtype=torch.bool).scatter(1, ids.long(), True)


def _forward(model, tokens):
    return model(tokens, torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1), attention_mask=None)


def check_ep2() -> dict:
    from megatron.core import parallel_state as ps

    from gmpo_megatron.megatron.expert_load import ExpertLoad, reduce_expert_load
    from gmpo_megatron.megatron.model_builder import BuildOptions, build_model
    from gmpo_megatron.megatron.parallel import init_distributed
    from gmpo_megatron.megatron.routing_replay import RoutingReplay, moe_routers
    from gmpo_megatron.megatron import step_data
    from gmpo_megatron.rollout.batch import BatchShape
    from gmpo_megatron.models.presets import tiny_qwen3_moe

    layout = init_distributed(ep=2, etp=1, seed=0)
    rank, other = layout.dp_rank, 1 - layout.dp_rank
    model = build_model(tiny_qwen3_moe(), BuildOptions(ep=2, etp=1))
    replay, load = RoutingReplay(model), ExpertLoad(model)
    model.eval()
    with torch.no_grad(), replay.record(("old", rank)):
        _forward(model, _tokens(seed=100 + rank))
    model.train()
    mine = replay.sequence_routes(("old", rank), SPANS, (ROWS, SEQ))
    local_load = {layer: int(c.sum()) for layer, c in load.counts().items()}
    reduced = load.metrics()  # world reduction: both ranks' tokens
    totals = {layer: int(c.sum()) for layer, c in
              reduce_expert_load(load.counts(), model.config.num_layers, EXPERTS).items()}
    # the trainer's R2 exchange: each DP rank recorded its ROWS samples, both need all of them
    counts = torch.tensor([n for _, _, n in SPANS] * 2)
    shape = BatchShape(torch.zeros_like(counts), counts)
    owned = [list(range(ROWS)), list(range(ROWS, 2 * ROWS))]
    everyone = step_data.exchange_sequence_routes(
        {rank * ROWS + j: r for j, r in enumerate(mine)}, shape, owned, [list(range(2 * ROWS))] * 2,
        replay.layers, replay.top_k, replay.dtype, step_data.data_groups(torch.device("cpu")))
    replay.clear()

    _perturb(model)
    theirs = [everyone[other * ROWS + j] for j in range(ROWS)]
    seen: dict = {}
    handles = _observe(model, seen)
    with torch.no_grad():
        _forward(model, _tokens(seed=100 + other))
    fresh_differs = any(not torch.equal(seen[layer].view(SEQ, ROWS, EXPERTS)[:n, j],
                                        _map(theirs[j][layer]))
                        for layer in replay.layers for j, n in enumerate(LENGTHS))
    replay.set_sequence_routes(("update", rank), theirs, SPANS, (ROWS, SEQ))
    with replay.replay(("update", rank)):
        output = _forward(model, _tokens(seed=100 + other))
    output.square().mean().backward()
    for handle in handles:
        handle.remove()
    replayed_equal = all(torch.equal(seen[layer].view(SEQ, ROWS, EXPERTS)[:n, j], _map(theirs[j][layer]))
                         for layer in replay.layers for j, n in enumerate(LENGTHS))
    remote_experts = any(bool((r[layer].long() // (EXPERTS // 2) != rank).any())
                         for r in theirs for layer in replay.layers)
    router_grads = all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0
                       for r in moe_routers(model).values())
    replay.remove()
    load.remove()
    return {"fresh_differs": fresh_differs, "replayed_equal": replayed_equal,
            "remote_experts_replayed": remote_experts, "router_grads": router_grads,
            "samples_exchanged": sorted(everyone), "local_load": local_load, "reduced_load": totals,
            "imbalance": reduced["moe_load_imbalance"]}


def check_tp2_sp() -> dict:
    from megatron.core import parallel_state as ps

    from gmpo_megatron.megatron.model_builder import BuildOptions, build_model
    from gmpo_megatron.megatron.parallel import init_distributed
    from gmpo_megatron.megatron.routing_replay import RoutingReplay
    from gmpo_megatron.models.presets import tiny_qwen3_moe

    layout = init_distributed(tp=2, etp=1, seed=0)
    model = build_model(tiny_qwen3_moe(), BuildOptions(tp=2, etp=1))
    assert model.config.sequence_parallel
    replay = RoutingReplay(model)
    tokens = _tokens(seed=7)
    model.eval()
    with torch.no_grad(), replay.record("old"):
        _forward(model, tokens)
    model.train()
    shard_rows = {layer: ids.shape[0] for layer, ids in replay.routes("old").items()}
    per_sequence = replay.sequence_routes("old", SPANS, (ROWS, SEQ),
                                          tp_group=ps.get_tensor_model_parallel_group())
    both: list = [None, None]
    dist.all_gather_object(both, per_sequence, group=ps.get_tensor_model_parallel_group())
    same_on_tp_ranks = all(torch.equal(both[0][j][layer], both[1][j][layer])
                           for j in range(ROWS) for layer in replay.layers)

    _perturb(model)
    order = [2, 0]
    spans = [(row, 0, LENGTHS[i]) for row, i in enumerate(order)]
    replay.set_sequence_routes("update", [per_sequence[i] for i in order], spans, (len(order), SEQ),
                               tp_rank=layout.tp_rank, tp_size=2)
    seen: dict = {}
    handles = _observe(model, seen)
    with replay.replay("update"):
        _forward(model, tokens[order])
    for handle in handles:
        handle.remove()
    half = SEQ // 2
    positions = range(layout.tp_rank * half, (layout.tp_rank + 1) * half)
    replayed_equal = True
    for layer in replay.layers:
        grid = seen[layer].view(half, len(order), EXPERTS)
        for row, i in enumerate(order):
            for local, t in enumerate(positions):
                if t < LENGTHS[i]:
                    replayed_equal &= torch.equal(grid[local, row], _map(per_sequence[i][layer][t:t + 1])[0])
    replay.remove()
    return {"shard_rows": shard_rows, "same_on_tp_ranks": same_on_tp_ranks,
            "replayed_equal": bool(replayed_equal)}


def main(report_path: str) -> None:
    report = {"ep2": check_ep2(), "tp2_sp": check_tp2_sp()}
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, report)
    if dist.get_rank() == 0:
        with open(report_path, "w") as f:
            json.dump(gathered, f)
    from gmpo_megatron.megatron.parallel import destroy_distributed

    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
