"""Micro-batch planning and the packed layout: exact coverage, budgets, balance, and packed ==
padded for log-probs and gradients through the real Megatron model."""

import random

import pytest
import torch

from gmpo_megatron.megatron.micro_batches import (
    Sample,
    build_micro_batch,
    plan_micro_batches,
    plan_packed_micro_batches,
)


def random_samples(n: int, seed: int, vocab: int = 64) -> list[Sample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p, r = rng.randint(1, 9), rng.randint(1, 7)
        out.append(Sample([rng.randrange(4, vocab) for _ in range(p)], [rng.randrange(4, vocab) for _ in range(r)],
                          [-rng.random() for _ in range(r)], 0.0, rng.uniform(-1, 1), i // 4, "stop",
                          old_log_probs=[-rng.random() for _ in range(r)]))
    return out


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("dp", [1, 2, 3, 4])
def test_packed_plan_covers_every_sequence_once_within_budget(seed, dp):
    samples = random_samples(37, seed)
    lengths = {i: s.length for i, s in enumerate(samples)}
    budget = random.Random(seed).randint(16, 60)
    indices = list(range(len(samples)))
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
    assert batch.tokens.shape[0] == 1 and total % 4 == 0
    assert total - sum(samples[i].length for i in (0, 2, 4)) < 4  # only tail padding
    visible = ~batch.attention_mask[0, 0]
    starts = [0, samples[0].length, samples[0].length + samples[2].length]
    for k, (i, start) in enumerate(zip((0, 2, 4), starts)):
        end = start + samples[i].length
        block = visible[start:end, start:end]
        assert torch.equal(block, torch.ones_like(block).tril())  # causal within the sequence
        assert not visible[start:end, :start].any() and not visible[start:end, end:].any()
        n = len(samples[i].response_ids)
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
    indices = list(range(len(samples)))

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
