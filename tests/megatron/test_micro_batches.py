"""Micro-batch planning and the packed layout: exact coverage, budgets, balance, packed ==
padded for log-probs and gradients through the real Megatron model, and micro-batches from the
tensor batch equal to the list-based builder the trainer had before (kept in the benchmark)."""

import importlib.util
import random
import sys
from pathlib import Path

import pytest
import torch

from gmpo_megatron.megatron.micro_batches import (
    build_micro_batch,
    plan_micro_batches,
    plan_packed_micro_batches,
)
from gmpo_megatron.rollout.batch import RolloutBatch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "data_path_bench.py"


def old_path():
    spec = importlib.util.spec_from_file_location("data_path_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def random_lists(n: int, seed: int, vocab: int = 64, max_prompt: int = 9, max_response: int = 7):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        p, r = rng.randint(1, max_prompt), rng.randint(1, max_response)
        rows.append(([rng.randrange(4, vocab) for _ in range(p)], [rng.randrange(4, vocab) for _ in range(r)],
                     [-rng.random() for _ in range(r)], float(rng.random() < 0.5), rng.uniform(-1, 1), i // 4,
                     rng.choice(["stop", "length"]), [-rng.random() for _ in range(r)]))
    return rows


def as_batch(rows) -> RolloutBatch:
    columns = list(zip(*rows))
    batch = RolloutBatch.from_lists(*columns[:7])
    batch.old_log_probs = torch.tensor([v for row in rows for v in row[7]], dtype=torch.float32)
    return batch


def random_samples(n: int, seed: int, vocab: int = 64) -> RolloutBatch:
    return as_batch(random_lists(n, seed, vocab))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("dp", [1, 2, 3, 4])
def test_packed_plan_covers_every_sequence_once_within_budget(seed, dp):
    samples = random_samples(37, seed)
    lengths = dict(enumerate(samples.shape.lengths.tolist()))
    budget = random.Random(seed).randint(16, 60)
    indices = list(range(samples.num_samples))
    plans = [plan_packed_micro_batches(lengths, indices, r, dp, budget) for r in range(dp)]
    flat = sorted(i for plan in plans for mb in plan for i in mb)
    assert flat == indices
    assert len({len(plan) for plan in plans}) == 1  # same schedule on every DP rank
    for plan in plans:
        for mb in plan:
            assert mb and sum(lengths[i] for i in mb) <= budget
    loads = [sum(lengths[i] for mb in plan for i in mb) for plan in plans]
    assert max(loads) - min(loads) <= max(lengths.values())  # greedy balance bound


def test_packed_plan_refuses_a_sequence_over_budget():
    with pytest.raises(ValueError, match="max_tokens_per_microbatch=10"):
        plan_packed_micro_batches({0: 11, 1: 3}, [0, 1], 0, 1, 10)


def test_plans_refuse_fewer_sequences_than_dp_ranks():
    with pytest.raises(ValueError, match="cannot feed 4 data-parallel ranks"):
        plan_packed_micro_batches({0: 3, 1: 3}, [0, 1], 0, 4, 100)
    with pytest.raises(ValueError, match="cannot feed 4 data-parallel ranks"):
        plan_micro_batches([0, 1], 0, 4, 8)


def test_packed_layout_isolates_sequences_and_indexes_responses():
    samples = random_samples(5, 11)
    batch = build_micro_batch(samples, [0, 2, 4], pad_id=0, seq_multiple=4, device=torch.device("cpu"),
                              packed=True)
    total = batch.tokens.shape[1]
    length = samples.shape.lengths.tolist()
    assert batch.tokens.shape[0] == 1 and total % 4 == 0
    assert total - sum(length[i] for i in (0, 2, 4)) < 4  # only tail padding
    visible = ~batch.attention_mask[0, 0]
    starts = [0, length[0], length[0] + length[2]]
    for k, (i, start) in enumerate(zip((0, 2, 4), starts)):
        end = start + length[i]
        block = visible[start:end, start:end]
        assert torch.equal(block, torch.ones_like(block).tril())  # causal within the sequence
        assert not visible[start:end, :start].any() and not visible[start:end, end:].any()
        n = int(samples.shape.response_lengths[i])
        # the logits at logit_index predict the next token, i.e. the response token
        assert torch.equal(batch.tokens[0, batch.logit_index[k, :n] + 1], batch.targets[k, :n])
        assert batch.response_mask[k, :n].all() and not batch.response_mask[k, n:].any()


def test_packed_equals_padded_log_probs_and_gradients(megatron_single_process):
    from gmpo_megatron.megatron.model_builder import BuildOptions, build_model
    from gmpo_megatron.megatron.train_step import _log_probs_of
    from gmpo_megatron.megatron.weights import load_hf_weights
    from gmpo_megatron.models import get_mapping
    from gmpo_megatron.models.presets import tiny_qwen3_moe
    from gmpo_megatron.components import checkpoint_layout_state
    from transformers import AutoModelForCausalLM

    config = tiny_qwen3_moe()
    torch.manual_seed(3)
    state = checkpoint_layout_state(AutoModelForCausalLM.from_config(config), get_mapping(config))
    model = build_model(config, BuildOptions())
    load_hf_weights(model, get_mapping(config), state.__getitem__)
    samples = random_samples(9, 4)
    indices = list(range(samples.num_samples))

    def log_probs_and_grads(packed: bool):
        model.zero_grad()
        batch = build_micro_batch(samples, indices, pad_id=0, seq_multiple=1, device=torch.device("cpu"),
                                  packed=packed)
        output = model(batch.tokens, batch.position_ids, attention_mask=batch.attention_mask)
        log_prob, _ = _log_probs_of(output, batch, 1.0, False)
        weights = torch.randn(log_prob.shape, generator=torch.Generator().manual_seed(0))
        (torch.where(batch.response_mask, log_prob, 0.0) * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return torch.where(batch.response_mask, log_prob, 0.0).detach(), grads

    padded_lp, padded_grads = log_probs_and_grads(False)
    packed_lp, packed_grads = log_probs_and_grads(True)
    # Tolerance: the packed row applies RoPE at absolute offsets; relative positions are equal,
    # the rotary tables' float rounding is not.
    assert (padded_lp - packed_lp).abs().max().item() <= 1e-5
    assert padded_grads.keys() == packed_grads.keys()
    for name in padded_grads:
        diff = (padded_grads[name] - packed_grads[name]).abs().max().item()
        scale = padded_grads[name].abs().max().item()
        assert diff <= 1e-5 * max(scale, 1.0), (name, diff, scale)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("packed", [True, False])
def test_micro_batches_from_the_tensor_batch_equal_the_list_builders(seed, packed):
    """Bit for bit, on odd sizes and random lengths, from a sub-batch holding the samples in
    another order (what a DP rank receives), with seq_multiple and min_shape padding."""
    bench = old_path()
    rng = random.Random(seed)
    rows = random_lists(rng.randint(5, 23), seed + 100, vocab=151_000, max_prompt=31, max_response=29)
    full = as_batch(rows)
    samples = [bench.Sample(p, r, lp, rw, ad, g, f, old_log_probs=old) for p, r, lp, rw, ad, g, f, old in rows]
    held = list(range(len(rows)))
    rng.shuffle(held)
    held = held[:rng.randint(3, len(held))]
    local = full.select(held)
    for _ in range(6):
        chosen = rng.sample(held, rng.randint(1, min(len(held), 1 if packed and rng.random() < 0.3 else 5)))
        seq_multiple = rng.choice([1, 2, 3])
        min_shape = (0, 0) if rng.random() < 0.5 else ((1 if packed else len(chosen) + 2), rng.randint(1, 120))
        new = build_micro_batch(local, chosen, pad_id=3, seq_multiple=seq_multiple, device=torch.device("cpu"),
                                packed=packed, min_shape=min_shape)
        old = bench.old_build_micro_batch(samples, chosen, pad_id=3, seq_multiple=seq_multiple, packed=packed,
                                          min_shape=min_shape)
        names = ["tokens", "position_ids", "attention_mask", "logit_index", "targets", "response_mask",
                 "old_log_prob", "rollout_log_prob", "advantages"]
        for name, expected in zip(names, old[:9]):
            got = getattr(new, name)
            if expected is None:
                assert got is None, name
            else:
                assert got.dtype == expected.dtype and torch.equal(got, expected), name
        assert new.spans == old[9] and new.sample_indices == chosen


def test_select_and_wire_round_trip_keep_every_field():
    rows = random_lists(11, 5)
    full = as_batch(rows)
    part = full.select([7, 2, 9])
    again = RolloutBatch.from_wire(full.shape, [7, 2, 9], part.wire_tensors())
    for name in ("tokens", "rollout_log_probs", "rewards", "advantages", "groups", "finish_reasons"):
        assert torch.equal(getattr(again, name), getattr(part, name)), name
    assert part.tokens.tolist() == rows[7][0] + rows[7][1] + rows[2][0] + rows[2][1] + rows[9][0] + rows[9][1]
    assert part.old_log_probs.tolist() == pytest.approx(rows[7][7] + rows[2][7] + rows[9][7], abs=1e-7)
    assert [("stop", "length")[int(f)] for f in part.finish_reasons] == [rows[i][6] for i in (7, 2, 9)]


def test_routes_pack_per_sample_and_a_partial_set_is_refused():
    rows = random_lists(4, 6)
    columns = list(zip(*rows))
    routes = [{layer: torch.randint(0, 8, (len(r[0]) + len(r[1]) - 1, 2), dtype=torch.uint8) for layer in (0, 3)}
              for r in rows]
    batch = RolloutBatch.from_lists(*columns[:7], routes=routes)
    part = batch.select([2, 0])
    for i in (2, 0):
        for layer in (0, 3):
            assert torch.equal(part.sample_routes(i)[layer], routes[i][layer])
    with pytest.raises(ValueError, match="no routed experts while others do"):
        RolloutBatch.from_lists(*columns[:7], routes=[routes[0], None, routes[2], routes[3]])


@pytest.mark.parametrize("seed", range(6))
def test_ragged_gather_and_scatter_equal_the_index_form(seed):
    """Slice copies (adjacent rows merged, empty rows skipped) equal indexing with ragged_index,
    for 1-d and [n, L, k] values, any row order, repeats and zero counts."""
    from gmpo_megatron.rollout.batch import exclusive_cumsum, ragged_gather, ragged_index, ragged_scatter

    gen = torch.Generator().manual_seed(seed)
    rows = int(torch.randint(1, 40, (1,), generator=gen))
    counts_all = torch.randint(0, 9, (rows,), generator=gen)
    starts_all = exclusive_cumsum(counts_all)
    total = int(counts_all.sum())
    chosen = torch.randint(0, rows, (int(torch.randint(0, 2 * rows, (1,), generator=gen)),), generator=gen)
    if seed % 2:
        chosen = chosen.unique()  # sorted, no repeats: what select() of sorted needs does, long runs
    starts, counts = starts_all[chosen], counts_all[chosen]
    for values in (torch.randn(total, generator=gen), torch.randint(0, 99, (total, 3, 2), generator=gen)):
        index = ragged_index(starts, counts)
        assert torch.equal(ragged_gather(values, starts, counts), values[index])
        if seed % 2:  # scatter needs distinct positions
            expected, got = values.clone(), values.clone()
            new = torch.zeros_like(values[index]) - 1
            expected[index] = new
            ragged_scatter(got, starts, counts, new)
            assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="values for"):
        ragged_scatter(torch.zeros(total + 1), [0], [total + 1], torch.zeros(total + 2))


@pytest.mark.parametrize("bad", [2**31, -1, 2**40])
def test_from_lists_refuses_token_ids_outside_int32(bad):
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 2\*\*31\)"):
        RolloutBatch.from_lists([[1, 2]], [[3, bad]], [[-0.5, -0.25]], [1.0], [0.5], [0], ["stop"])


def test_from_lists_keeps_ids_and_rounds_log_probs_as_float32_does():
    rows = random_lists(9, 11, vocab=2**31 - 1)
    batch = as_batch(rows)
    assert batch.tokens.dtype == torch.int32
    assert batch.tokens.tolist() == [t for row in rows for t in row[0] + row[1]]
    expected = torch.tensor([v for row in rows for v in row[2]], dtype=torch.float64).float()
    assert batch.rollout_log_probs.dtype == torch.float32 and torch.equal(batch.rollout_log_probs, expected)
