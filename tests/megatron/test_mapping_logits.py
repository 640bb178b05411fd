"""Megatron model -> HF state dict (through the mapping) -> transformers model: same logits.

Each architecture's Megatron model is filled from a randomly initialised transformers model, then
the Megatron weights are exported with ``iter_hf_weights`` into a *fresh* transformers model, and
both forwards are compared (fp32, max |diff| <= 1e-4). The round trip must be bit-exact.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config

from gmpo_megatron.megatron.model_builder import BuildOptions, build_model
from gmpo_megatron.megatron.weights import iter_hf_weights, load_hf_weights
from gmpo_megatron.models import get_mapping
from gmpo_megatron.models.presets import tiny_qwen3_moe
from gmpo_megatron.components import checkpoint_layout_state

CONFIGS = {
    "qwen3_moe": lambda: tiny_qwen3_moe(hidden_size=48, head_dim=20, num_experts=6, moe_intermediate_size=36,
                                        num_hidden_layers=3, mlp_only_layers=[1]),
    "qwen3": lambda: Qwen3Config(vocab_size=96, hidden_size=40, intermediate_size=72, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                 max_position_embeddings=128, tie_word_embeddings=False),
    "qwen2_tied": lambda: Qwen2Config(vocab_size=80, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=6, num_key_value_heads=2,
                                      max_position_embeddings=128, tie_word_embeddings=True),
}


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_megatron_to_hf_logits_match(arch, megatron_single_process):
    config = CONFIGS[arch]()
    torch.manual_seed(7)
    source = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # non-trivial norms and biases so a swapped tensor cannot hide
        for name, param in source.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.2)
    state = checkpoint_layout_state(source, get_mapping(config))
    mapping = get_mapping(config)
    model = build_model(config, BuildOptions())
    load_hf_weights(model, mapping, state.__getitem__)

    exported = dict(iter_hf_weights(model, mapping))
    assert set(exported) == set(state)
    for name, tensor in state.items():
        assert torch.equal(exported[name], tensor), name

    target = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    target_state = checkpoint_layout_state(target, mapping)
    assert set(target_state) == set(exported)
    from gmpo_megatron.rollout.embedded import EmbeddedEngine

    engine = EmbeddedEngine(config, pad_token_id=0)
    engine.update_weights(exported.items(), version=1)
    ids = torch.randint(0, config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        megatron_logits = model.eval()(ids, torch.arange(17).expand(3, -1), attention_mask=None)
        hf_logits = engine.model(ids).logits
    assert (megatron_logits - hf_logits).abs().max().item() <= 1e-4
