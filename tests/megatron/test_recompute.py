"""Activation recompute (``train.recompute*``): the settings are validated, reach Megatron's
TransformerConfig, and training with them equals training without (loss, grad norm, log-probs and
every weight after two optimizer steps through the trainer's step functions)."""

import random
import re

import pytest
import torch

from gmpo_megatron.config import ConfigError, load_config
from gmpo_megatron.megatron.model_builder import BuildOptions, transformer_config
from gmpo_megatron.models.presets import tiny_qwen3_moe

# 3 layers, the middle one dense: 'mlp' and 'moe' both have something to recompute, and uniform /
# block chunkings differ from one layer at a time.
MIXED = dict(num_hidden_layers=3, mlp_only_layers=[1])


# -- validation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [
    ["train.recompute=full"],
    ["train.recompute=full", "train.recompute_method=block", "train.recompute_num_layers=1"],
    ["train.recompute=selective"],
    ["train.recompute=selective", "train.recompute_modules=[core_attn, layernorm, moe]"],
])
def test_valid_settings_load(overrides):
    load_config(None, overrides)


@pytest.mark.parametrize("overrides, message", [
    (["train.recompute_method=uniform"], "set but train.recompute=none"),
    (["train.recompute=partial"], "train.recompute"),
    (["train.recompute=full", "train.recompute_modules=[moe]"], "recompute_modules chooses submodules"),
    (["train.recompute=full", "train.recompute_num_layers=2"], "needs train.recompute_method"),
    (["train.recompute=full", "train.recompute_method=block"], "block needs train.recompute_num_layers"),
    (["train.recompute=selective", "train.recompute_method=uniform"], "apply to train.recompute=full"),
    (["train.recompute=selective", "train.recompute_num_layers=1"], "apply to train.recompute=full"),
    (["train.recompute=selective", "train.recompute_modules=[]"], "recomputes nothing"),
    (["train.recompute=selective", "train.recompute_modules=[attention]"], "unknown module 'attention'"),
    (["train.recompute=selective", "train.recompute_modules=[mla_up_proj]"], "multi-latent attention"),
    (["train.recompute=selective", "train.recompute_modules=[shared_experts]"], "Qwen3-MoE has none"),
    (["train.recompute=selective", "train.recompute_modules=[moe, moe]"], "lists a module twice"),
    (["train.recompute=full", "train.recompute_method=uniform", "train.recompute_num_layers=0"],
     "greater than or equal to 1"),
])
def test_invalid_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_settings_reach_the_transformer_config():
    moe = tiny_qwen3_moe(**MIXED)
    full = transformer_config(moe, BuildOptions(recompute="full"))
    assert (full.recompute_granularity, full.recompute_method, full.recompute_num_layers) == ("full", "uniform", 1)
    block = transformer_config(moe, BuildOptions(recompute="full", recompute_method="block", recompute_num_layers=2))
    assert (block.recompute_method, block.recompute_num_layers) == ("block", 2)
    selective = transformer_config(moe, BuildOptions(recompute="selective"))
    assert selective.recompute_granularity == "selective" and selective.recompute_modules == ["core_attn"]
    assert transformer_config(moe, BuildOptions()).recompute_granularity is None


def _dense():
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8)


@pytest.mark.parametrize("hf_config, options, message", [
    (_dense, dict(recompute="selective", recompute_modules=["moe"]), "this model has none"),
    (tiny_qwen3_moe, dict(recompute="selective", recompute_modules=["mlp"]), "every layer of this model is MoE"),
    (None, dict(recompute="selective", recompute_modules=["moe_act"]), "without TE"),
    (None, dict(recompute="full", recompute_method="uniform", recompute_num_layers=2), r"divide.*\[3\]"),
    (None, dict(recompute="full", recompute_method="block", recompute_num_layers=4), r"at most 3"),
    # PP2 with a 1-layer first stage: uniform chunks of 2 do not tile it
    (None, dict(pp=2, pp_first_stage_layers=1, recompute="full", recompute_method="uniform",
                recompute_num_layers=2), r"\[1, 2\]"),
])
def test_settings_the_model_cannot_honour_are_refused(hf_config, options, message):
    config = hf_config() if hf_config else tiny_qwen3_moe(**MIXED)
    with pytest.raises(ValueError, match=message):
        transformer_config(config, BuildOptions(**options))


# -- equality with no recompute ------------------------------------------------------------------
def _samples(n: int, seed: int):
    from gmpo_megatron.rollout.batch import RolloutBatch

    rng = random.Random(seed)
    prompts, responses = [], []
    for _ in range(n):
        p, r = rng.randint(2, 11), rng.randint(1, 9)
        prompts.append([rng.randrange(4, 64) for _ in range(p)])
        responses.append([rng.randrange(4, 64) for _ in range(r)])
    return RolloutBatch.from_lists(prompts, responses, [[-rng.random() for _ in r] for r in responses],
                                   [0.0] * n, [rng.uniform(-1, 1) for _ in range(n)],
                                   [i // 4 for i in range(n)], ["stop"] * n)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The layernorm tolerance below was measured with one intra-op thread, which fixes the order
    of every float reduction; with two threads the same rounding, amplified by Adam, moved a
    weight by 1.4e-5 (still a small fraction of lr=1e-3). Pinned, and restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hf_state():
    from transformers import AutoModelForCausalLM

    from gmpo_megatron.components import checkpoint_layout_state
    from gmpo_megatron.models import get_mapping

    config = tiny_qwen3_moe(**MIXED)
    torch.manual_seed(7)
    return config, checkpoint_layout_state(AutoModelForCausalLM.from_config(config), get_mapping(config))


def _train(hf_state, replay: bool = False, **options):
    """Old log-probs, two optimizer steps of GMPO over packed micro-batches (two per mini-batch),
    then log-probs again: the trainer's step functions, at TP1 in this process."""
    from gmpo_megatron.megatron.micro_batches import build_micro_batch, plan_packed_micro_batches
    from gmpo_megatron.megatron.model_builder import build_model
    from gmpo_megatron.megatron.optimizer import OptimSettings, build_optimizer, wrap_ddp
    from gmpo_megatron.megatron.routing_replay import RoutingReplay
    from gmpo_megatron.megatron.train_step import LossSettings, compute_old_log_probs, train_on_batches
    from gmpo_megatron.megatron.weights import load_hf_weights
    from gmpo_megatron.models import get_mapping

    config, state = hf_state
    model = build_model(config, BuildOptions(**options))
    load_hf_weights(model, get_mapping(config), state.__getitem__)
    model = wrap_ddp(model, True)
    optimizer, scheduler = build_optimizer(model, OptimSettings(
        lr=1e-3, min_lr=0.0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8,
        grad_clip=1.0, warmup_steps=0, total_steps=2, distributed_optimizer=True, bf16=False))
    samples = _samples(13, 5)

    def batches(indices):
        lengths = {i: int(samples.lengths[i]) for i in indices}
        plan = plan_packed_micro_batches(lengths, indices, 0, 1, max(sum(lengths.values()) // 2 + 1, 20))
        return [build_micro_batch(samples, chunk, pad_id=0, seq_multiple=1, device=torch.device("cpu"),
                                  packed=True) for chunk in plan]

    routing = RoutingReplay(model) if replay else None
    everything = list(range(samples.num_samples))
    routes = compute_old_log_probs(model, samples, batches(everything), 1.0, replay=routing)
    old = samples.old_log_probs.clone()
    settings = LossSettings("gmpo", {}, 1.0, 0.0)
    losses, norms, calls = [], [], {}
    hooks = [module.register_forward_hook(lambda m, i, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
             for name, module in model.module.named_modules() if WATCHED.search(name)]
    for mini in ([0, 2, 4, 6, 8, 10, 12], [1, 3, 5, 7, 9, 11]):
        metrics, norm, ok = train_on_batches(model, optimizer, batches(mini), settings, routing, routes)
        assert ok
        scheduler.step(1)
        losses.append(metrics.to_dict()["loss"])
        norms.append(norm)
    for hook in hooks:  # counted: the updates' forwards, recomputes included
        hook.remove()
    if routing is not None:
        routing.remove()
    compute_old_log_probs(model, samples, batches(everything), 1.0)
    after = samples.old_log_probs.clone()
    weights = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    return dict(old=old, losses=losses, norms=norms, after=after, weights=weights, calls=calls)


WATCHED = re.compile(r"decoder\.layers\.\d+(\.self_attention\.core_attention|\.input_layernorm|"
                     r"\.pre_mlp_layernorm|\.mlp|\.mlp\.router)?$")


@pytest.fixture(scope="module")
def no_recompute(megatron_single_process, hf_state):
    return {replay: _train(hf_state, replay=replay) for replay in (False, True)}


SETTINGS = {  # name: (options, the modules run twice in the updates: forward + recompute)
    "full_uniform_1": (dict(recompute="full"), r"."),  # every layer, with all its submodules
    "full_uniform_3": (dict(recompute="full", recompute_method="uniform", recompute_num_layers=3), r"."),
    "full_block_2": (dict(recompute="full", recompute_method="block", recompute_num_layers=2),
                     r"layers\.[01]\b"),
    "selective_core_attn": (dict(recompute="selective"), r"core_attention$"),
    "selective_mlp": (dict(recompute="selective", recompute_modules=["mlp"]), r"layers\.1\.mlp$"),
    # the MoE layer checkpoints its inner forward (router, dispatch, experts): the router re-runs
    "selective_moe": (dict(recompute="selective", recompute_modules=["moe"]), r"router$"),
    "selective_layernorm": (dict(recompute="selective", recompute_modules=["layernorm"]), r"layernorm$"),
    "selective_all": (dict(recompute="selective", recompute_modules=["core_attn", "layernorm", "mlp", "moe"]),
                      r"core_attention$|layernorm$|layers\.1\.mlp$|router$"),
}
# R2 routing replay matters where the router is re-run in the backward: full and moe recompute
CASES = [(name, False) for name in sorted(SETTINGS)] + [
    (name, True) for name in ("full_uniform_1", "full_uniform_3", "full_block_2", "selective_moe", "selective_all")]


@pytest.mark.parametrize("name, replay", CASES, ids=[f"{n}{'-r2' if r else ''}" for n, r in CASES])
def test_training_with_recompute_equals_without(no_recompute, hf_state, name, replay):
    """fp32 on CPU: bit-identical, except where the layernorm recompute changes the order in which
    the residual gradient's branches are summed (float addition): there loss, grad norm and
    log-probs within 1e-6 (relative) and weights within 1e-5. Gradients then differ by ~4e-9, but
    Adam divides each gradient element by its own magnitude, so on near-zero elements (an expert
    that saw few tokens) that rounding moves a weight by a fraction of lr=1e-3 (measured 3.6e-6;
    tests/e2e/test_train_cli.py's layouts have the same reason for 1e-5).
    With R2 routing replay, the router's re-run in the backward replays the same experts.
    The recompute really happens: exactly the chosen modules run twice as often."""
    options, twice = SETTINGS[name]
    base, run = no_recompute[replay], _train(hf_state, replay=replay, **options)
    tol = 1e-6 if "layernorm" in str(options) else 0.0
    assert run["calls"].keys() == base["calls"].keys() and len(base["calls"]) == 17  # 3 layers x 5, 2 routers
    for module, count in base["calls"].items():
        assert run["calls"][module] == count * (2 if re.search(twice, module) else 1), (module, run["calls"])

    def close(a, b):
        return abs(a - b) <= tol * max(1.0, abs(a))

    assert base["norms"][1] > 0 and base["losses"][1] != base["losses"][0]  # real updates compared
    assert all(close(a, b) for a, b in zip(base["losses"], run["losses"])), (base["losses"], run["losses"])
    assert all(close(a, b) for a, b in zip(base["norms"], run["norms"])), (base["norms"], run["norms"])
    for key in ("old", "after"):  # every response token's log-prob, as tensors
        a, b = base[key].double(), run[key].double()
        assert a.shape == b.shape and bool(((a - b).abs() <= tol * a.abs().clamp(min=1.0)).all()), key
    assert base["weights"].keys() == run["weights"].keys()
    for n, w in base["weights"].items():
        assert (w - run["weights"][n]).abs().max().item() <= 10 * tol, n
