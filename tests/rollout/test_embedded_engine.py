"""EmbeddedEngine sampling: reproducibility, log-probs, finish reasons, top-k/top-p, validation."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from tiny_hf_configs import tiny_qwen3_moe_config

from gmpo_megatron.rollout import EmbeddedEngine, Rollout, RolloutEngine, SamplingParams

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [4], [20, 21]]  # unequal lengths: left padding matters


@pytest.fixture(scope="module")
def engine():
    engine = EmbeddedEngine(tiny_qwen3_moe_config(), pad_token_id=0, init_seed=1)
    yield engine
    engine.close()


def full_forward_log_probs(model, rollout: Rollout, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) of the response tokens from one no-cache, unpadded forward. [R]"""
    ids = torch.tensor([rollout.prompt_ids + rollout.response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0].float()
    log_probs = torch.log_softmax(logits / temperature, dim=-1)
    start = len(rollout.prompt_ids) - 1  # logits at position t predict token t+1
    positions = torch.arange(start, start + len(rollout.response_ids))
    return log_probs[positions, torch.tensor(rollout.response_ids)]


def test_embedded_engine_satisfies_the_rollout_engine_protocol(engine):
    assert isinstance(engine, RolloutEngine)
    assert engine.weight_version == 0


def test_same_seed_weights_and_inputs_give_identical_rollouts(engine):
    sampling = SamplingParams(n=3, temperature=1.0, max_new_tokens=10, stop_token_ids=(2,))
    first = engine.generate(PROMPTS, sampling, seed=7)
    second = engine.generate(PROMPTS, sampling, seed=7)
    assert [r.response_ids for r in first] == [r.response_ids for r in second]
    assert [r.response_log_probs for r in first] == [r.response_log_probs for r in second]
    other_seed = engine.generate(PROMPTS, sampling, seed=8)
    assert [r.response_ids for r in first] != [r.response_ids for r in other_seed]


def test_samples_do_not_depend_on_batch_chunking(engine):
    sampling = SamplingParams(n=3, temperature=1.0, max_new_tokens=10)
    whole = engine.generate(PROMPTS, sampling, seed=3)
    engine.max_batch_size = 2
    try:
        chunked = engine.generate(PROMPTS, sampling, seed=3)
    finally:
        engine.max_batch_size = 64
    assert [r.response_ids for r in whole] == [r.response_ids for r in chunked]
    for a, b in zip(whole, chunked):
        assert torch.allclose(torch.tensor(a.response_log_probs), torch.tensor(b.response_log_probs), atol=1e-5)


def test_rollouts_are_prompt_major_with_n_contiguous_samples(engine):
    rollouts = engine.generate(PROMPTS, SamplingParams(n=3, max_new_tokens=2), seed=0)
    assert [r.prompt_index for r in rollouts] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert all(r.prompt_ids == PROMPTS[r.prompt_index] for r in rollouts)


@pytest.mark.parametrize("temperature, top_p, top_k", [(1.0, 1.0, 0), (0.7, 0.9, 20), (1.3, 1.0, 5)])
def test_log_probs_equal_full_forward_log_softmax_of_logits_over_temperature(engine, temperature, top_p, top_k):
    # With filtering on, the log-probs must still be those of the UNFILTERED tempered softmax.
    sampling = SamplingParams(n=2, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=12)
    for rollout in engine.generate(PROMPTS, sampling, seed=11):
        expected = full_forward_log_probs(engine.model, rollout, temperature)
        assert torch.allclose(torch.tensor(rollout.response_log_probs), expected, atol=1e-5, rtol=0)


def test_greedy_takes_the_argmax_and_reports_log_softmax_of_raw_logits(engine):
    rollouts = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=8), seed=0)
    for rollout in rollouts:
        ids = torch.tensor([rollout.prompt_ids + rollout.response_ids])
        logits = engine.model(input_ids=ids).logits[0].float()
        start = len(rollout.prompt_ids) - 1
        assert logits[start : start + 8].argmax(-1).tolist() == rollout.response_ids
        expected = full_forward_log_probs(engine.model, rollout, temperature=1.0)
        assert torch.allclose(torch.tensor(rollout.response_log_probs), expected, atol=1e-5, rtol=0)


def test_stop_token_ends_the_response_with_stop_and_is_included(engine):
    free = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=8), seed=0)
    # Stop on the 4th greedy token of prompt 1: it must end there, others run on or stop earlier.
    stop_id = free[1].response_ids[3]
    stopped = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=8, stop_token_ids=(stop_id,)), seed=0)
    for before, after in zip(free, stopped):
        if stop_id in before.response_ids:
            end = before.response_ids.index(stop_id) + 1
            assert after.finish_reason == "stop"
            assert after.response_ids == before.response_ids[:end]
            assert after.response_ids[-1] == stop_id
            assert len(after.response_log_probs) == end
        else:
            assert after.finish_reason == "length"
            assert after.response_ids == before.response_ids
    assert stopped[1].finish_reason == "stop" and len(stopped[1].response_ids) <= 4


def test_max_new_tokens_gives_length_finish_and_exact_length(engine):
    for max_new_tokens in (1, 5):
        rollouts = engine.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=max_new_tokens), seed=4)
        assert all(r.finish_reason == "length" for r in rollouts)
        assert all(len(r.response_ids) == len(r.response_log_probs) == max_new_tokens for r in rollouts)


def test_finished_rows_are_padded_while_others_keep_sampling(engine):
    # Stop on every even id: rows end at different steps; a finished row must get no more tokens.
    stops = tuple(range(0, 64, 2))
    rollouts = engine.generate(PROMPTS, SamplingParams(n=8, max_new_tokens=6, stop_token_ids=stops), seed=5)
    for rollout in rollouts:
        assert all(t % 2 == 1 for t in rollout.response_ids[:-1])  # nothing after a stop token
        assert len(rollout.response_ids) == len(rollout.response_log_probs)
        if rollout.finish_reason == "stop":
            assert rollout.response_ids[-1] % 2 == 0
        else:
            assert rollout.response_ids[-1] % 2 == 1 and len(rollout.response_ids) == 6
    assert len({len(r.response_ids) for r in rollouts}) >= 3  # rows really finished at different steps
    assert {r.finish_reason for r in rollouts} == {"stop", "length"}
    for rollout in rollouts:  # and the survivors' log-probs are unaffected by their finished neighbours
        expected = full_forward_log_probs(engine.model, rollout, temperature=1.0)
        assert torch.allclose(torch.tensor(rollout.response_log_probs), expected, atol=1e-5, rtol=0)


def test_top_k_1_equals_greedy(engine):
    greedy = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=8), seed=0)
    top1 = engine.generate(PROMPTS, SamplingParams(n=2, temperature=1.0, top_k=1, max_new_tokens=8), seed=9)
    for i, rollout in enumerate(top1):
        assert rollout.response_ids == greedy[i // 2].response_ids
        # at temperature 1 the reported log-probs are the same softmax(logits) as greedy's
        assert torch.allclose(torch.tensor(rollout.response_log_probs), torch.tensor(greedy[i // 2].response_log_probs), atol=1e-6)


def test_tiny_top_p_equals_greedy(engine):
    greedy = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=8), seed=0)
    nucleus = engine.generate(PROMPTS, SamplingParams(temperature=1.0, top_p=1e-6, max_new_tokens=8), seed=9)
    assert [r.response_ids for r in nucleus] == [r.response_ids for r in greedy]


def test_top_k_samples_only_among_the_k_best_tokens(engine):
    rollouts = engine.generate(PROMPTS, SamplingParams(n=8, top_k=3, max_new_tokens=6), seed=2)
    for rollout in rollouts:
        ids = torch.tensor([rollout.prompt_ids + rollout.response_ids])
        logits = engine.model(input_ids=ids).logits[0]
        start = len(rollout.prompt_ids) - 1
        top3 = logits[start : start + len(rollout.response_ids)].topk(3, dim=-1).indices
        assert all(token in top3[t].tolist() for t, token in enumerate(rollout.response_ids))


def test_first_token_frequencies_match_the_tempered_softmax(engine):
    temperature, draws = 0.8, 4000
    rollouts = engine.generate([PROMPTS[1]], SamplingParams(n=draws, temperature=temperature, max_new_tokens=1), seed=6)
    counts = torch.bincount(torch.tensor([r.response_ids[0] for r in rollouts]), minlength=64).double()
    logits = engine.model(input_ids=torch.tensor([PROMPTS[1]])).logits[0, -1].double()
    probs = torch.softmax(logits / temperature, -1)
    total_variation = 0.5 * (counts / draws - probs).abs().sum().item()
    assert total_variation < 0.06  # ~0.02 expected from sampling noise alone at 4000 draws


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(n=0), "n="),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(stop_token_ids=(-1,)), "stop_token_ids"),
    ],
)
def test_invalid_sampling_params_are_refused_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_invalid_prompts_and_seeds_are_refused(engine):
    sampling = SamplingParams(max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt 1"):
        engine.generate([[5], []], sampling, seed=0)
    with pytest.raises(ValueError, match=r"\[64\]"):
        engine.generate([[5, 64]], sampling, seed=0)
    with pytest.raises(ValueError, match="stop_token_ids"):
        engine.generate([[5]], SamplingParams(stop_token_ids=(99,)), seed=0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        engine.generate([[5]], SamplingParams(max_new_tokens=200), seed=0)
    with pytest.raises(ValueError, match="seed"):
        engine.generate([[5]], sampling, seed=-1)


def test_closed_engine_refuses_work():
    engine = EmbeddedEngine(tiny_qwen3_moe_config(), pad_token_id=0)
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.generate([[5]], SamplingParams(), seed=0)


def test_bf16_tiny_moe_generates_where_grouped_mm_cannot_run():
    # moe_intermediate 20 * 2 bytes is not a multiple of 16: torch's grouped_mm refuses it, so the
    # engine must fall back to the eager experts loop.
    engine = EmbeddedEngine(tiny_qwen3_moe_config(), pad_token_id=0, dtype=torch.bfloat16)
    rollouts = engine.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=5), seed=0)
    for rollout in rollouts:
        assert len(rollout.response_ids) == 5
        expected = full_forward_log_probs(engine.model, rollout, temperature=1.0)
        assert torch.allclose(torch.tensor(rollout.response_log_probs), expected, atol=0.1)  # bf16 rounding only
