"""EmbeddedEngine.update_weights / state_dict_hf under HF checkpoint names (per-expert for MoE)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import transformers
from safetensors.torch import load_file
from tiny_hf_configs import TINY_CONFIGS, tiny_qwen3_moe_config

from gmpo_megatron.rollout import EmbeddedEngine, SamplingParams

INPUT_IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])


def saved_checkpoint(config, seed: int, directory) -> tuple[transformers.PreTrainedModel, dict[str, torch.Tensor]]:
    """A model with seed-`seed` weights and its tensors as save_pretrained writes them (checkpoint names)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(directory)
    return model, load_file(os.path.join(directory, "model.safetensors"))


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    return saved_checkpoint(tiny_qwen3_moe_config(), seed=123, directory=tmp_path_factory.mktemp("qwen3_moe"))


def test_transformers_keeps_qwen3_moe_experts_fused_gate_then_up(moe_checkpoint):
    # The layout the engine relies on: gate_up_proj [E, 2I, H] = [gate_e; up_e], down_proj [E, H, I].
    model, checkpoint = moe_checkpoint
    experts = model.model.layers[1].mlp.experts
    assert tuple(experts.gate_up_proj.shape) == (4, 40, 48) and tuple(experts.down_proj.shape) == (4, 48, 20)
    for e in range(4):
        prefix = f"model.layers.1.mlp.experts.{e}"
        assert torch.equal(experts.gate_up_proj[e, :20], checkpoint[f"{prefix}.gate_proj.weight"])
        assert torch.equal(experts.gate_up_proj[e, 20:], checkpoint[f"{prefix}.up_proj.weight"])
        assert torch.equal(experts.down_proj[e], checkpoint[f"{prefix}.down_proj.weight"])


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_update_from_a_saved_checkpoint_makes_engine_logits_equal_that_models(family, tmp_path):
    config = TINY_CONFIGS[family]()
    reference, checkpoint = saved_checkpoint(config, seed=321, directory=tmp_path)
    engine = EmbeddedEngine(config, pad_token_id=0, init_seed=0)
    with torch.no_grad():
        assert not torch.equal(engine.model(input_ids=INPUT_IDS).logits, reference(input_ids=INPUT_IDS).logits)
        assert sorted(engine.state_dict_hf()) == sorted(checkpoint)  # the engine speaks checkpoint names

        engine.update_weights(checkpoint.items(), version=1)

        assert engine.weight_version == 1
        assert torch.equal(engine.model(input_ids=INPUT_IDS).logits, reference(input_ids=INPUT_IDS).logits)
    exported = engine.state_dict_hf()
    assert all(torch.equal(exported[name], tensor) for name, tensor in checkpoint.items())


def test_tied_model_has_no_lm_head_in_checkpoint_and_refuses_one(tmp_path):
    config = TINY_CONFIGS["qwen2_tied"]()
    _, checkpoint = saved_checkpoint(config, seed=5, directory=tmp_path)
    engine = EmbeddedEngine(config, pad_token_id=0)
    assert "lm_head.weight" not in checkpoint and "lm_head.weight" not in engine.state_dict_hf()
    engine.update_weights(checkpoint.items(), version=1)
    assert torch.equal(engine.model.lm_head.weight, checkpoint["model.embed_tokens.weight"])  # still tied
    with pytest.raises(ValueError, match="tied to 'model.embed_tokens.weight'"):
        engine.update_weights([("lm_head.weight", checkpoint["model.embed_tokens.weight"])], version=2, partial=True)


@pytest.fixture
def moe_engine():
    engine = EmbeddedEngine(tiny_qwen3_moe_config(), pad_token_id=0)
    yield engine
    engine.close()


def test_unknown_tensor_name_is_refused_by_name_and_nothing_is_loaded(moe_engine, moe_checkpoint):
    _, checkpoint = moe_checkpoint
    before = moe_engine.state_dict_hf()
    # in-memory fused names are not checkpoint names; an expert index past E does not exist
    for bad in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.4.up_proj.weight"):
        tensors = list(checkpoint.items()) + [(bad, torch.zeros(20, 48))]
        with pytest.raises(ValueError, match=f"unknown tensor '{bad}'"):
            moe_engine.update_weights(tensors, version=1)
    after = moe_engine.state_dict_hf()
    assert moe_engine.weight_version == 0 and all(torch.equal(before[n], after[n]) for n in before)


def test_wrong_shape_is_refused_naming_tensor_and_shapes(moe_engine, moe_checkpoint):
    _, checkpoint = moe_checkpoint
    name = "model.layers.1.mlp.experts.2.down_proj.weight"
    tensors = dict(checkpoint)
    tensors[name] = tensors[name].t().contiguous()  # [I, H] instead of [H, I]
    with pytest.raises(ValueError, match=rf"'{name}' has shape \(20, 48\), the model expects \(48, 20\)"):
        moe_engine.update_weights(tensors.items(), version=1)
    assert moe_engine.weight_version == 0


def test_full_update_missing_a_tensor_is_refused(moe_engine, moe_checkpoint):
    _, checkpoint = moe_checkpoint
    tensors = {n: t for n, t in checkpoint.items() if n != "model.layers.0.mlp.experts.3.up_proj.weight"}
    with pytest.raises(ValueError, match=r"missing 1 of .*experts\.3\.up_proj"):
        moe_engine.update_weights(tensors.items(), version=1)
    assert moe_engine.weight_version == 0


def test_partial_update_loads_only_the_named_expert_slice(moe_engine, moe_checkpoint):
    _, checkpoint = moe_checkpoint
    name = "model.layers.0.mlp.experts.3.up_proj.weight"
    before = moe_engine.state_dict_hf()
    moe_engine.update_weights([(name, checkpoint[name])], version=1, partial=True)
    after = moe_engine.state_dict_hf()
    assert torch.equal(after[name], checkpoint[name])
    assert all(torch.equal(before[n], after[n]) for n in before if n != name)


def test_weight_versions_must_increase(moe_engine, moe_checkpoint):
    _, checkpoint = moe_checkpoint
    moe_engine.update_weights(checkpoint.items(), version=3)
    for stale in (3, 2):
        with pytest.raises(ValueError, match="versions must increase"):
            moe_engine.update_weights(checkpoint.items(), version=stale)
    assert moe_engine.weight_version == 3


def test_non_finite_and_duplicate_tensors_are_refused(moe_engine, moe_checkpoint):
    _, checkpoint = moe_checkpoint
    nan = torch.full_like(checkpoint["model.norm.weight"], float("nan"))
    with pytest.raises(ValueError, match="'model.norm.weight' contains NaN"):
        moe_engine.update_weights([("model.norm.weight", nan)], version=1, partial=True)
    twice = [("model.norm.weight", checkpoint["model.norm.weight"])] * 2
    with pytest.raises(ValueError, match="sent twice"):
        moe_engine.update_weights(twice, version=1, partial=True)


def test_bf16_tensors_are_cast_to_the_engine_dtype(moe_engine, moe_checkpoint):
    _, checkpoint = moe_checkpoint
    moe_engine.update_weights(((n, t.bfloat16()) for n, t in checkpoint.items()), version=1)
    exported = moe_engine.state_dict_hf()
    assert all(exported[n].dtype == torch.float32 and torch.equal(exported[n], t.bfloat16().float()) for n, t in checkpoint.items())


def test_generation_follows_the_loaded_weights(moe_engine, moe_checkpoint, tmp_path):
    model, checkpoint = moe_checkpoint
    sampling = SamplingParams(temperature=0.0, max_new_tokens=6)
    moe_engine.update_weights(checkpoint.items(), version=1)
    rollout = moe_engine.generate([[5, 6, 7]], sampling, seed=0)[0]
    expected = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=6, do_sample=False, pad_token_id=0)[0, 3:]
    assert rollout.response_ids == expected.tolist()


def test_sender_may_reuse_one_buffer_for_every_tensor(moe_engine, moe_checkpoint):
    # Bucketed weight sync refills the same buffer; the engine must copy each tensor as it arrives.
    _, checkpoint = moe_checkpoint
    buffer = torch.empty(max(t.numel() for t in checkpoint.values()))

    def reused_buffer_stream():
        for name, tensor in checkpoint.items():
            view = buffer[: tensor.numel()].view(tensor.shape)
            view.copy_(tensor)
            yield name, view

    moe_engine.update_weights(reused_buffer_stream(), version=1)
    exported = moe_engine.state_dict_hf()
    assert all(torch.equal(exported[name], tensor) for name, tensor in checkpoint.items())
