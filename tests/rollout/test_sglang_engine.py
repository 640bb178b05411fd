"""SGLangEngine against a real SGLang 0.5.21 server on CPU (no fake anywhere): generation,
log-probs, weight updates and versions, routed experts (R3), abort, refusals."""

import threading
import time

import pytest
import torch
import transformers
from safetensors.torch import save_file

from gmpo_megatron.rollout.embedded import checkpoint_state_dict
from gmpo_megatron.rollout.engine import DiskWeights, GenerationAborted, RolloutEngine, SamplingParams
from gmpo_megatron.rollout.sglang import RouteLayout, SGLangEngine
from gmpo_megatron.rollout.sglang_http import SGLangError

pytestmark = pytest.mark.sglang

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [4], [20, 21, 30, 31, 32]]


def moe_layout(config) -> RouteLayout:
    return RouteLayout(config.num_hidden_layers, tuple(range(config.num_hidden_layers)),
                       config.num_experts_per_tok, config.num_local_experts)


def push_random_weights(engine, server, tmp_path, seed: int, version: int):
    """A random model of the server's architecture, written as a weight update and loaded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(server.hf_config, dtype=torch.float32)
    path = tmp_path / f"v{version}"
    path.mkdir()
    state = {k: v.contiguous() for k, v in checkpoint_state_dict(model).items()}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    engine.update_weights(DiskWeights(path, version), version=version)
    return model.eval()


@pytest.fixture
def moe(sglang_server):
    return sglang_server("moe")


@pytest.fixture
def engine(moe):
    engine = SGLangEngine(urls=[moe.url], max_in_flight=16, routes=moe_layout(moe.hf_config))
    yield engine
    engine.close()


def hf_log_probs(model, prompt, response, temperature=1.0):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0].float()
    log_probs = torch.log_softmax(logits / temperature, dim=-1)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    return log_probs[positions, torch.tensor(response)]


def test_sglang_engine_satisfies_the_protocol(engine):
    assert isinstance(engine, RolloutEngine)
    assert engine.weight_version == 0  # a fresh client: nothing pushed yet


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generate_is_prompt_major_with_the_servers_log_probs_of_softmax_over_t(engine, moe, tmp_path, temperature):
    model = push_random_weights(engine, moe, tmp_path, seed=3, version=1)
    sampling = SamplingParams(n=3, temperature=temperature, max_new_tokens=9, stop_token_ids=(2, 7))
    seen = []
    rollouts = engine.generate(PROMPTS, sampling, seed=11, on_result=seen.append)
    assert len(rollouts) == len(PROMPTS) * 3 and len(seen) == len(rollouts)
    assert [(r.prompt_index, r.sample_index) for r in rollouts] == [(p, s) for p in range(4) for s in range(3)]
    worst = 0.0
    for r in rollouts:
        assert r.prompt_ids == PROMPTS[r.prompt_index] and r.weight_version == 1
        assert 1 <= len(r.response_ids) <= 9 and len(r.response_log_probs) == len(r.response_ids)
        if r.finish_reason == "stop":
            assert r.response_ids[-1] in (2, 7)
        else:
            assert r.finish_reason == "length" and len(r.response_ids) == 9
        ours = hf_log_probs(model, r.prompt_ids, r.response_ids, temperature)
        worst = max(worst, (ours - torch.tensor(r.response_log_probs)).abs().max().item())
    # fp32 on both sides; the server's batched kernels differ from transformers' by rounding only
    assert worst < 1e-4, worst


def test_greedy_matches_transformers_and_weight_updates_take_effect(engine, moe, tmp_path):
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=8)
    first = push_random_weights(engine, moe, tmp_path, seed=5, version=1)
    a = engine.generate(PROMPTS, greedy, seed=0)
    for r in a:
        expected = first.generate(torch.tensor([r.prompt_ids]), max_new_tokens=8, do_sample=False,
                                  pad_token_id=0)[0, len(r.prompt_ids):].tolist()
        assert r.response_ids == expected
    push_random_weights(engine, moe, tmp_path, seed=6, version=2)
    b = engine.generate(PROMPTS, greedy, seed=0)
    assert {r.weight_version for r in b} == {2}
    assert [r.response_ids for r in a] != [r.response_ids for r in b]
    push_random_weights(engine, moe, tmp_path, seed=5, version=3)  # back to the first weights
    assert [r.response_ids for r in engine.generate(PROMPTS, greedy, seed=0)] == [r.response_ids for r in a]
    health = engine.health()
    assert health.healthy and health.servers[0]["weight_version"] == "3"


def test_stale_versions_are_refused(engine, moe, tmp_path):
    push_random_weights(engine, moe, tmp_path, seed=1, version=4)
    with pytest.raises(ValueError, match="must increase"):
        engine.update_weights(DiskWeights(tmp_path / "v4", 4), version=4)


def test_routed_experts_equal_the_hf_routers_top_k_token_by_token(engine, moe, tmp_path):
    model = push_random_weights(engine, moe, tmp_path, seed=8, version=1)
    rollouts = engine.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=6), seed=4)
    top_k = moe.hf_config.num_experts_per_tok
    checked = mismatched = 0
    for r in rollouts:
        tokens = r.prompt_ids + r.response_ids
        routes = r.routed_experts
        assert sorted(routes) == list(range(moe.hf_config.num_hidden_layers))
        with torch.no_grad():
            out = model(input_ids=torch.tensor([tokens]), output_router_logits=True, use_cache=False)
        for layer, logits in enumerate(out.router_logits):
            ours = logits.float().topk(top_k, dim=-1).indices[: len(tokens) - 1].sort(-1).values
            theirs = routes[layer].long().sort(-1).values
            assert theirs.shape == (len(tokens) - 1, top_k) and routes[layer].dtype == torch.uint8
            # near-ties of router logits may break differently between kernels: count them
            mismatched += int((ours != theirs).any(-1).sum())
            checked += theirs.shape[0]
    assert checked > 0 and mismatched <= checked // 50, (mismatched, checked)


def test_abort_stops_a_running_generation(engine, moe, tmp_path):
    push_random_weights(engine, moe, tmp_path, seed=2, version=1)
    long = SamplingParams(n=8, max_new_tokens=200)
    errors = []

    def run():
        try:
            engine.generate(PROMPTS * 4, long, seed=1)
        except GenerationAborted as error:
            errors.append(error)

    worker = threading.Thread(target=run)
    worker.start()
    time.sleep(1.0)
    engine.abort()
    worker.join(timeout=120)
    assert not worker.is_alive() and errors
    # the engine stays usable
    assert len(engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2), seed=0)) == 1


def test_unreachable_url_is_a_clear_error():
    with pytest.raises(SGLangError, match="rollout.sglang.urls.*127.0.0.1:9"):
        SGLangEngine(urls=["http://127.0.0.1:9"])


def test_a_server_that_never_becomes_healthy_is_reported_with_its_log(tmp_path):
    from sglang_support import SGLANG_PYTHON

    from gmpo_megatron.rollout.sglang_launch import ServerSpec, free_port

    spec = ServerSpec(python=SGLANG_PYTHON, host="127.0.0.1", port=free_port(), cpu=True,
                      log_path=tmp_path / "bad.log")
    engine = SGLangEngine(launch=[spec])
    try:
        with pytest.raises(SGLangError, match="exited during start-up.*log"):
            engine.update_weights(DiskWeights(tmp_path / "no-such-model", 1), version=1)
    finally:
        engine.close()


def test_a_launched_server_inherits_no_torchrun_variable(monkeypatch):
    """Under torchrun the trainer's environment holds RANK, MASTER_PORT, TORCHELASTIC_* ...; with
    TORCHELASTIC_USE_AGENT_STORE the server's own TCPStore turned into a client and never started."""
    from gmpo_megatron.rollout.sglang_launch import ServerSpec

    torchrun = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1", "ROLE_RANK": "1", "ROLE_NAME": "default",
                "ROLE_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
                "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RUN_ID": "none",
                "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0"}
    for key, value in torchrun.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("GMPO_KEEP_ME", "1")
    env = ServerSpec(python="python", host="127.0.0.1", port=1, env={"SGLANG_X": "y"}).environment()
    assert not set(torchrun) & set(env)
    assert env["GMPO_KEEP_ME"] == "1" and env["SGLANG_X"] == "y"


def test_extra_args_may_not_override_the_launchers_own_flags():
    from gmpo_megatron.rollout.sglang_launch import ServerSpec

    with pytest.raises(ValueError, match="--tp-size"):
        ServerSpec(python="python", host="127.0.0.1", port=1, extra_args=["--tp-size", "2"])


def test_a_response_from_another_weight_version_is_an_error(moe, tmp_path):
    """Two trainers on one server: after the other one's update, this one's responses carry a
    version it never pushed, which must stop it rather than train on the wrong policy."""
    from gmpo_megatron.rollout.sglang_http import BadResponse

    ours = SGLangEngine(urls=[moe.url])
    other = SGLangEngine(urls=[moe.url])
    try:
        (tmp_path / "ours").mkdir()
        (tmp_path / "other").mkdir()
        push_random_weights(ours, moe, tmp_path / "ours", seed=1, version=1)
        push_random_weights(other, moe, tmp_path / "other", seed=2, version=7)
        with pytest.raises(BadResponse, match="weight version '7', the trainer holds 1"):
            ours.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2), seed=0)
    finally:
        ours.close()
        other.close()
