"""What we send to SGLang and how we read its answers, checked without a server (the real server
runs in test_sglang_engine.py): only contract fields go out, and every malformed, aborted or short
answer is an error naming the server, never a silent short sample."""

import base64

import numpy as np
import pytest

from gmpo_megatron.rollout.engine import SamplingParams, request_seed
from gmpo_megatron.rollout.sglang_http import (
    GENERATE_KEYS,
    SAMPLING_KEYS,
    BadResponse,
    generate_payload,
    parse_generation,
)

SAMPLING = SamplingParams(n=4, temperature=0.8, top_p=0.9, top_k=5, max_new_tokens=3, stop_token_ids=(2,))


def _answer(ids, finish, logprobs=None, version="7", routes=None):
    meta = {"finish_reason": finish, "weight_version": version,
            "output_token_logprobs": logprobs if logprobs is not None else [[-0.5, t, None] for t in ids]}
    if routes is not None:
        meta["routed_experts"] = base64.b64encode(np.asarray(routes, dtype="<i4").tobytes()).decode()
    return {"text": "", "output_ids": ids, "meta_info": meta}


def test_payload_carries_only_contract_fields_and_one_sample_with_its_seed():
    body = generate_payload([5, 6], SAMPLING, seed=123, return_routed_experts=True)
    assert set(body) <= GENERATE_KEYS and set(body["sampling_params"]) <= SAMPLING_KEYS
    params = body["sampling_params"]
    assert params["n"] == 1 and params["sampling_seed"] == 123 and params["top_k"] == 5
    assert params["stop_token_ids"] == [2] and body["return_logprob"] is True
    assert "seed" not in params and "max_tokens" not in params  # not SGLang's names
    off = generate_payload([5], SamplingParams(top_k=0, temperature=0.0), seed=1)
    assert off["sampling_params"]["top_k"] == -1 and "sampling_seed" not in off["sampling_params"]
    assert "return_routed_experts" not in off


def test_request_seeds_are_a_function_of_step_prompt_and_sample():
    seeds = {request_seed(9, p, s) for p in range(20) for s in range(8)}
    assert len(seeds) == 160 and all(0 <= x < 2**63 for x in seeds)
    assert request_seed(9, 3, 1) == request_seed(9, 3, 1) != request_seed(10, 3, 1)


def test_a_well_formed_answer_parses():
    got = parse_generation(_answer([7, 9, 2], {"type": "stop", "matched": 2}, routes=np.zeros((4, 2, 2))),
                           prompt_len=2, sampling=SAMPLING, url="u", want_routes=True)
    assert got.response_ids == [7, 9, 2] and got.finish_reason == "stop" and got.weight_version == "7"
    assert got.log_probs == [-0.5] * 3 and got.routed_experts.shape == (4, 4)


@pytest.mark.parametrize("answer, match", [
    (_answer([7], {"type": "abort", "message": "gone"}), "aborted"),
    (_answer([7, 8], {"type": "length", "length": 2}), "length after 2 of 3"),
    (_answer([7, 8, 9], {"type": "stop", "matched": 2}), "matched 2, not the last token"),
    (_answer([], {"type": "length", "length": 0}), "empty response"),
    (_answer([7, 8, 9], {"type": "length", "length": 3}, logprobs=[[-1.0, 7, None]]), "1 entries for 3 tokens"),
    (_answer([7, 8, 9], {"type": "length", "length": 3},
             logprobs=[[-1.0, 7, None], [-1.0, 5, None], [-1.0, 9, None]]), r"output_token_logprobs\[1\]"),
    (_answer([7, 8, 9], {"type": "length", "length": 3},
             logprobs=[[-1.0, 7, None], [float("nan"), 8, None], [-1.0, 9, None]]), "finite log-prob"),
    ({"error": "boom"}, "not an object with output_ids"),
    (_answer([7, 8, 9], {"type": "weird"}), "unknown finish_reason"),
])
def test_malformed_or_aborted_answers_are_errors(answer, match):
    with pytest.raises(BadResponse, match=match):
        parse_generation(answer, prompt_len=2, sampling=SAMPLING, url="http://s:1", want_routes=False)


def test_missing_or_misshapen_routes_are_errors():
    ok = _answer([7, 8, 9], {"type": "length", "length": 3})
    with pytest.raises(BadResponse, match="enable-return-routed-experts"):
        parse_generation(ok, prompt_len=2, sampling=SAMPLING, url="u", want_routes=True)
    bad = _answer([7, 8, 9], {"type": "length", "length": 3}, routes=np.zeros(7))
    with pytest.raises(BadResponse, match="do not split into 4 positions"):
        parse_generation(bad, prompt_len=2, sampling=SAMPLING, url="u", want_routes=True)


def test_launched_cpu_servers_get_a_bounded_kv_cache_and_loopback(tmp_path):
    """Left to itself a CPU server sizes its KV cache from free memory (12.8 GB for the tiny
    model on a 24 GB machine); the launcher bounds it by what can be in flight."""
    from gmpo_megatron.components import sglang_engine
    from gmpo_megatron.config import load_config
    from gmpo_megatron.models.presets import load_hf_config

    cfg = load_config("examples/moe/tiny_cpu.yaml", [
        f"output_dir={tmp_path}", "rollout.engine=sglang", "rollout.sglang.launch.python=python3",
        "rollout.sglang.launch.cpu=true", "rollout.sglang.max_in_flight=64"])
    engine = sglang_engine(cfg, load_hf_config("tiny-qwen3-moe"), tmp_path)
    try:
        (server,) = engine._servers
        spec = server.process.spec
        context = cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
        assert spec.max_total_tokens == 64 * context and spec.context_length == context
        command = spec.command(tmp_path, 1)
        assert command[command.index("--host") + 1] == "127.0.0.1" and "--device" in command
        assert spec.log_path == tmp_path / "sglang" / "server_0.log"
    finally:
        engine.close()
