"""torchrun worker (2 gloo ranks) for test_step_data_mp.py: the step's data and the weight gather
across processes, against what one process computes. Rank 0 writes a JSON report.

    torchrun --nproc_per_node 2 step_data_worker.py <report.json>

Data (DP2, and TP2 where the two ranks are one replica): random batches with odd sizes and
random lengths, random packed (old pass) and padded (updates) plans; ``distribute`` must hand each rank exactly
``select(needs[dp_rank])`` of the batch only rank 0 held; ``exchange_old_log_probs`` and
``exchange_sequence_routes`` must complete each rank's needed samples with the values their
owners computed (every rank knows the reference from the seed, only the owners fill it in).

Weights (TP2, EP2, PP2, TP2+EP2 with ETP1, DP2; buckets of 3000 bytes, smaller than most
tensors, and of 64 MiB): ``HFWeightGather.stream()`` yields on rank 0 exactly the HF tensors the
model was loaded from, and nothing elsewhere; ``gather_stage`` equals the per-tensor
``_stage_tensors`` on each stage's sender, in order.
"""

from __future__ import annotations

import json
import random
import sys

import torch
import torch.distributed as dist


def random_batch(seed: int, with_routes: bool):
    from gmpo_megatron.rollout.batch import RolloutBatch

    rng = random.Random(seed)
    n = rng.choice([5, 7, 11, 13])
    prompts = [[rng.randrange(1, 500) for _ in range(rng.randint(1, 17))] for _ in range(n)]
    responses = [[rng.randrange(1, 500) for _ in range(rng.randint(1, 23))] for _ in range(n)]
    log_probs = [[-rng.random() for _ in r] for r in responses]
    routes = None
    if with_routes:
        routes = [{layer: torch.randint(0, 8, (len(p) + len(r) - 1, 2), generator=torch.Generator().manual_seed(
            seed * 100 + i * 7 + layer), dtype=torch.int64).to(torch.uint8) for layer in (0, 1)}
            for i, (p, r) in enumerate(zip(prompts, responses))]
    return RolloutBatch.from_lists(prompts, responses, log_probs, [rng.random() for _ in range(n)],
                                   [rng.uniform(-1, 1) for _ in range(n)], [i // 3 for i in range(n)],
                                   [rng.choice(["stop", "length"]) for _ in range(n)], routes=routes)


def random_plans(shape, seed: int, dp: int):
    from gmpo_megatron.megatron.micro_batches import plan_micro_batches, plan_packed_micro_batches

    rng = random.Random(seed + 1)
    lengths = dict(enumerate(shape.lengths.tolist()))
    budget = max(lengths.values()) + rng.randint(0, 40)
    indices = list(range(shape.num_samples))
    old = [plan_packed_micro_batches(lengths, indices, r, dp, budget) for r in range(dp)]
    rng.shuffle(indices)
    half = len(indices) // 2
    size = rng.randint(1, 3)  # update mini-batches: padded plans, random micro-batch size
    updates = [[plan_micro_batches(mini, r, dp, size) for r in range(dp)] for mini in (indices[:half], indices[half:])]
    return old, updates


def check_data(layout, report: dict, name: str) -> None:
    from gmpo_megatron.megatron import step_data
    from gmpo_megatron.rollout.batch import BatchShape

    groups = step_data.data_groups(torch.device("cpu"))
    rank, dp = dist.get_rank(), layout.dp
    results = []
    for seed in range(6):
        reference = random_batch(seed, with_routes=seed % 2 == 1)  # every rank: the reference only
        held = reference if rank == 0 else None
        lengths = reference.shape.to_tensor() if rank == 0 else torch.empty_like(reference.shape.to_tensor())
        dist.broadcast(lengths, src=0)
        shape = reference.shape if rank == 0 else BatchShape.from_parts(reference.shape.header(), lengths)
        old, updates = random_plans(shape, seed, dp)
        needs = step_data.needed_samples([old, *updates], dp)
        local = step_data.distribute(held, shape, needs, groups)
        expected = reference.select(needs[layout.dp_rank])
        fields = ["sample_index", "tokens", "rollout_log_probs", "rewards", "advantages", "groups", "finish_reasons"]
        same = all(torch.equal(getattr(local, f), getattr(expected, f)) for f in fields)
        same = same and ((local.routes is None and expected.routes is None)
                         or torch.equal(local.routes, expected.routes))
        # old log-probs: the reference values, filled in only where this DP rank computed them
        truth = torch.randn(int(reference.response_lengths.sum()), generator=torch.Generator().manual_seed(seed))
        owned = step_data.flat_samples(old)
        local.old_log_probs = torch.full((int(local.response_lengths.sum()),), float("nan"))
        mine = owned[layout.dp_rank]
        local.old_log_probs[local.response_index(mine)] = truth[reference.response_index(mine)]
        update_needs = step_data.needed_samples(updates, dp)
        step_data.exchange_old_log_probs(local, owned, update_needs, groups)
        wanted = update_needs[layout.dp_rank]
        old_ok = torch.equal(local.old_log_probs[local.response_index(wanted)], truth[reference.response_index(wanted)])
        # R2 routes: per-sequence [length, k] per layer, recorded by the owner
        gen = torch.Generator().manual_seed(seed + 50)
        all_routes = {i: {layer: torch.randint(0, 8, (int(shape.lengths[i]), 2), generator=gen).to(torch.uint8)
                          for layer in (1, 3)} for i in range(shape.num_samples)}
        got = step_data.exchange_sequence_routes({i: all_routes[i] for i in mine}, shape, owned, update_needs,
                                                 [1, 3], 2, torch.uint8, groups)
        routes_ok = all(torch.equal(got[i][layer], all_routes[i][layer]) for i in wanted for layer in (1, 3))
        results.append({"seed": seed, "n": shape.num_samples, "held": local.num_samples, "same": bool(same),
                        "old_ok": bool(old_ok), "routes_ok": bool(routes_ok),
                        "received_others": sorted(set(wanted) - set(mine))})
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    report[name] = gathered


def check_weights(layout_kwargs: dict, report: dict, name: str) -> None:
    from transformers import AutoModelForCausalLM

    from gmpo_megatron.components import checkpoint_layout_state
    from gmpo_megatron.megatron.model_builder import BuildOptions, build_model
    from gmpo_megatron.megatron.parallel import init_distributed
    from gmpo_megatron.megatron.weight_gather import HFWeightGather, gather_stage, is_stage_sender
    from gmpo_megatron.megatron.weights import _stage_tensors, load_hf_weights
    from gmpo_megatron.models import get_mapping
    from gmpo_megatron.models.presets import tiny_qwen3_moe

    init_distributed(**layout_kwargs)
    config = tiny_qwen3_moe()
    mapping = get_mapping(config)
    torch.manual_seed(11)
    state = checkpoint_layout_state(AutoModelForCausalLM.from_config(config), mapping)
    model = build_model(config, BuildOptions(**layout_kwargs))
    load_hf_weights(model, mapping, state.__getitem__)
    out = {}
    for bucket in (3000, 64 << 20):
        streamed = list(HFWeightGather(model, mapping, bucket).stream())
        names = [n for n, _ in streamed]
        exact = (dist.get_rank() != 0 or (sorted(names) == sorted(state) and len(set(names)) == len(names)
                 and all(torch.equal(t, state[n]) for n, t in streamed)))
        stage = list(gather_stage(model, None, bucket))
        reference = list(_stage_tensors(model))  # every rank gets everything: the per-tensor path
        stage_ok = (([n for n, _ in stage] == [n for n, _ in reference]
                     and all(torch.equal(a, b) for (_, a), (_, b) in zip(stage, reference)))
                    if is_stage_sender() else stage == [])
        out[str(bucket)] = {"rank0_only": dist.get_rank() == 0 or not streamed, "exact": bool(exact),
                            "stage_ok": bool(stage_ok), "count": len(streamed)}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, out)
    report[name] = gathered


def main() -> None:
    from gmpo_megatron.megatron.parallel import init_distributed

    report: dict = {}
    check_data(init_distributed(), report, "data_dp2")
    check_data(init_distributed(tp=2), report, "data_tp2")
    layouts = {"tp2": {"tp": 2}, "ep2": {"ep": 2}, "pp2": {"pp": 2}, "tp2_ep2_etp1": {"tp": 2, "ep": 2, "etp": 1},
               "dp2": {}}
    for name, kwargs in layouts.items():
        check_weights(kwargs, report, f"weights_{name}")
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
