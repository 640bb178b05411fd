"""R3 through a real SGLang server: the experts Megatron's routers use in the old-log-prob pass
are the ones the server reported, token by token, even after the routers have moved so far that
fresh routing would pick others."""

import pytest
import torch
import transformers

from gmpo_megatron.megatron.disk_sync import write_weights_dir
from gmpo_megatron.megatron.micro_batches import build_micro_batch
from gmpo_megatron.megatron.model_builder import BuildOptions, build_model
from gmpo_megatron.megatron.routing_replay import RoutingReplay, moe_routers
from gmpo_megatron.megatron.train_step import compute_old_log_probs
from gmpo_megatron.megatron.weights import load_hf_weights
from gmpo_megatron.models import get_mapping
from gmpo_megatron.rollout.batch import RolloutBatch
from gmpo_megatron.rollout.embedded import checkpoint_state_dict
from gmpo_megatron.rollout.engine import DiskWeights, SamplingParams
from gmpo_megatron.rollout.sglang import RouteLayout, SGLangEngine

pytestmark = pytest.mark.sglang


def _experts_used(model, run):
    """Per MoE layer, the sorted expert ids each token was sent to during ``run()``."""
    seen = {}
    handles = [router.register_forward_hook(
        lambda mod, args, out, layer=layer: seen.setdefault(layer, []).append(out[1].detach()))
        for layer, router in moe_routers(model).items()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for layer, maps in seen.items():
        (routing_map,) = maps  # one micro-batch
        out[layer] = torch.stack([row.nonzero().flatten() for row in routing_map])
    return out


def test_replayed_experts_equal_the_servers_token_by_token(megatron_single_process, sglang_server, tmp_path):
    server = sglang_server("moe")
    config = server.hf_config
    mapping = get_mapping(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(21)
        hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = build_model(config, BuildOptions())
    load_hf_weights(model, mapping, checkpoint_state_dict(hf).__getitem__)
    # the trainer's own writer produces the update the server loads
    path = write_weights_dir(model, mapping, tmp_path / "sync", 1, static_files=server.model_dir)
    layout = RouteLayout(config.num_hidden_layers, tuple(range(config.num_hidden_layers)),
                         config.num_experts_per_tok, config.num_local_experts)
    engine = SGLangEngine(urls=[server.url], routes=layout)
    try:
        engine.update_weights(DiskWeights(path, 1), version=1)
        rollouts = engine.generate([[5, 6, 7, 8], [9, 10], [11, 12, 13]], SamplingParams(n=2, max_new_tokens=6),
                                   seed=3)
    finally:
        engine.close()
    samples = RolloutBatch.from_lists(
        [r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts],
        [r.response_log_probs for r in rollouts], [0.0] * len(rollouts), [1.0] * len(rollouts),
        [r.prompt_index for r in rollouts], [r.finish_reason for r in rollouts],
        routes=[r.routed_experts for r in rollouts])
    batch = build_micro_batch(samples, list(range(samples.num_samples)), pad_id=0, seq_multiple=1,
                              device=torch.device("cpu"), packed=True)

    # move the routers: fresh routing now disagrees with the server on many tokens
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for router in moe_routers(model).values():
            router.weight.copy_(torch.randn(router.weight.shape, generator=generator))

    def old_pass(replay=None, routes=None):
        return lambda: compute_old_log_probs(model, samples, [batch], 1.0, replay=replay, engine_routes=routes)

    fresh = _experts_used(model, old_pass())
    replay = RoutingReplay(model)
    try:
        routes = {i: samples.sample_routes(i) for i in range(samples.num_samples)}
        replayed = _experts_used(model, old_pass(replay, routes))
    finally:
        replay.remove()
    differs = 0
    for layer in layout.moe_layers:
        for i, (row, start, n) in enumerate(batch.spans):
            theirs = rollouts[i].routed_experts[layer].long().sort(-1).values  # [n - 1, top_k]
            used = replayed[layer][start:start + n - 1]
            assert torch.equal(used, theirs), (layer, start)
            differs += int((fresh[layer][start:start + n - 1] != theirs).any(-1).sum())
    assert differs > 0  # the check above could not pass by fresh routing agreeing
