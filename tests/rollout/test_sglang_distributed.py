"""weight_sync=distributed against a real SGLang 0.5.21 CPU server: the weight-update group over
gloo, flattened buckets broadcast into the server, and its generations afterwards equal
transformers with the pushed weights (no fake anywhere)."""

import pytest
import torch
import transformers

from gmpo_megatron.rollout.embedded import checkpoint_state_dict
from gmpo_megatron.rollout.engine import SamplingParams
from gmpo_megatron.rollout.sglang import SGLangEngine
from gmpo_megatron.rollout.sglang_distributed import ServerTarget, StageSender, group_ranks
from gmpo_megatron.rollout.sglang_http import SGLangError
from gmpo_megatron.rollout.weight_buckets import WeightSpec, plan_buckets

pytestmark = pytest.mark.sglang

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [4], [20, 21, 30, 31, 32]]
BUCKET_BYTES = 16 << 10  # the tiny MoE (776 KB) goes in ~50 buckets; q_proj (24 KiB) alone


def random_model(hf_config, seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    return model.eval()


def push(engine, sender, model, version):
    """One update the way the trainer's stage sender does it: session, non-expert pass, expert
    pass (the last bucket sets the version), end of session."""
    state = {k: v.contiguous() for k, v in checkpoint_state_dict(model).items()}
    specs = [WeightSpec(name, tuple(t.shape), t.dtype) for name, t in state.items()]
    assert engine.begin_distributed_update(version) == list(sender.targets)
    if not sender.is_open:
        sender.open()
    for experts in (False, True):
        part = [s for s in specs if s.is_expert == experts]
        sender.send(part, iter((s.name, state[s.name]) for s in part),
                    final_version=str(version) if experts else None)
    engine.end_distributed_update(version)
    return specs


@pytest.fixture
def moe(sglang_server):
    return sglang_server("moe")


@pytest.fixture
def engine(moe):
    engine = SGLangEngine(urls=[moe.url], max_in_flight=16)
    yield engine
    engine.close()


def test_group_ranks_put_the_sender_first_then_each_servers_tp_ranks():
    targets = [ServerTarget("http://a", 2), ServerTarget("http://b", 1), ServerTarget("http://c", 4)]
    assert group_ranks(targets) == (8, [1, 3, 4])


def test_broadcast_weights_reach_the_server_bit_for_bit(engine, moe):
    """Greedy generations and log-probs equal transformers with the pushed weights; a second push
    through the same group replaces them; the version is the last bucket's."""
    targets = [ServerTarget(moe.url, 1)]  # the test server runs TP1
    sender = StageSender(targets, "gmpo-test-weights", bucket_bytes=BUCKET_BYTES, timeout_s=300)
    try:
        first = random_model(moe.hf_config, seed=21)
        specs = push(engine, sender, first, version=1)
        assert sender.buckets_sent == len(plan_buckets(specs, BUCKET_BYTES)) > 20
        assert sender.bytes_sent == sum(s.nbytes for s in specs)

        greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=8)
        a = engine.generate(PROMPTS, greedy, seed=0)
        worst = 0.0
        for r in a:
            ids = torch.tensor([r.prompt_ids])
            expected = first.generate(ids, max_new_tokens=8, do_sample=False,
                                      pad_token_id=0)[0, len(r.prompt_ids):].tolist()
            assert r.response_ids == expected and r.weight_version == 1
            with torch.no_grad():
                logits = first(input_ids=torch.tensor([r.prompt_ids + r.response_ids])).logits[0]
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            positions = torch.arange(len(r.prompt_ids) - 1, len(r.prompt_ids) + len(r.response_ids) - 1)
            ours = log_probs[positions, torch.tensor(r.response_ids)]
            worst = max(worst, (ours - torch.tensor(r.response_log_probs)).abs().max().item())
        assert worst < 1e-4, worst

        second = random_model(moe.hf_config, seed=22)
        push(engine, sender, second, version=2)
        b = engine.generate(PROMPTS, greedy, seed=0)
        assert {r.weight_version for r in b} == {2}
        assert [r.response_ids for r in b] != [r.response_ids for r in a]
        for r in b:
            expected = second.generate(torch.tensor([r.prompt_ids]), max_new_tokens=8, do_sample=False,
                                       pad_token_id=0)[0, len(r.prompt_ids):].tolist()
            assert r.response_ids == expected
        health = engine.health()
        assert health.healthy and health.servers[0]["weight_version"] == "2"
    finally:
        assert sender.close() == []


def test_a_refused_bucket_fails_at_once_instead_of_hanging(engine, moe):
    """A server that will not join a broadcast (here: asked for a group it does not have) answers
    its HTTP call with an error; the sender raises that error instead of waiting out the group's
    timeout, and the next update opens a fresh group."""
    import time

    targets = engine.begin_distributed_update(1)
    sender = StageSender(targets, "gmpo-test-refusal", bucket_bytes=BUCKET_BYTES, timeout_s=300)
    try:
        sender.open()
        sender.group_name = "no-such-group"  # the server's receive refuses before any broadcast
        spec = WeightSpec("model.norm.weight", (moe.hf_config.hidden_size,), torch.float32)
        start = time.monotonic()
        with pytest.raises(SGLangError, match="no-such-group"):
            sender.send([spec], iter([(spec.name, torch.ones(spec.shape))]), final_version="1")
        assert time.monotonic() - start < 60
        assert not sender.is_open  # abandoned: a broadcast is still pending in it
        with pytest.raises(SGLangError, match="weight version"):
            engine.end_distributed_update(1)  # the session is closed, the version never came
        sender.group_name = "gmpo-test-refusal-2"
        push(engine, sender, random_model(moe.hf_config, seed=23), version=2)
        assert engine.weight_version == 2
    finally:
        sender.close()


def test_a_tensor_the_model_lacks_is_an_error_naming_the_server(engine, moe):
    targets = engine.begin_distributed_update(1)
    sender = StageSender(targets, "gmpo-test-unknown", bucket_bytes=BUCKET_BYTES, timeout_s=300)
    try:
        sender.open()
        spec = WeightSpec("model.layers.0.self_attn.q_proj.weight", (3, 3), torch.float32)  # wrong shape
        with pytest.raises(SGLangError, match=moe.url):
            sender.send([spec], iter([(spec.name, torch.ones(3, 3))]), final_version="1")
    finally:
        sender.close()
        with pytest.raises(SGLangError):
            engine.end_distributed_update(1)


@pytest.fixture(scope="module")
def second_moe(tmp_path_factory):
    """A second server of the same model (same random start weights as the session's)."""
    from sglang_support import SGLangTestServer

    server = SGLangTestServer("moe", tmp_path_factory.mktemp("second_moe"))
    yield server
    server.process.stop()


@pytest.mark.slow
def test_two_servers_in_one_group_both_take_every_bucket(moe, second_moe):
    """World size 3 (sender, server 0's rank 1, server 1's rank 2): each server's log-probs of a
    probe sequence equal transformers' with the pushed weights."""
    engine = SGLangEngine(urls=[moe.url, second_moe.url], max_in_flight=16)
    sender = StageSender([ServerTarget(moe.url, 1), ServerTarget(second_moe.url, 1)], "gmpo-test-two",
                         bucket_bytes=BUCKET_BYTES, timeout_s=300)
    try:
        model = random_model(moe.hf_config, seed=31)
        push(engine, sender, model, version=1)
        tokens = [3, 17, 9, 40, 2, 11, 25, 6, 30, 8]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([tokens])).logits[0].float()
        expected = torch.log_softmax(logits, dim=-1)[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])]
        per_server = engine.probe(tokens)
        assert len(per_server) == 2
        for theirs in per_server:
            assert (torch.tensor(theirs) - expected).abs().max().item() < 1e-4
        assert [s["weight_version"] for s in engine.health().servers] == ["1", "1"]
    finally:
        assert sender.close() == []
        engine.close()

