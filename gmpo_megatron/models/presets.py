"""Model presets: tiny random configs for the CPU demo and tests, and the real Qwen configs.

The tiny preset has every structural feature of Qwen3-30B-A3B that can break a converter or a
parallel layout: GQA, head_dim != hidden / heads, QK-norm, top-k routing with renormalised
probabilities, untied embeddings.
"""

from __future__ import annotations

from transformers import AutoConfig, Qwen3MoeConfig

TINY_QWEN3_MOE = dict(
    vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=24, intermediate_size=128, moe_intermediate_size=48,
    num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
    mlp_only_layers=[], max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, initializer_range=0.02,
    router_aux_loss_coef=0.0, output_router_logits=False,
)


def tiny_qwen3_moe(**overrides) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(**{**TINY_QWEN3_MOE, **overrides})


PRESETS = {"tiny-qwen3-moe": tiny_qwen3_moe}


def load_hf_config(name_or_path: str, **overrides):
    """A preset name, or a local directory / config.json of an HF model (never the hub)."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path](**overrides)
    import os

    path = name_or_path
    if os.path.isfile(path):
        path = os.path.dirname(path) or "."
    if not os.path.isdir(path):
        raise ValueError(
            f"model.hf_config={name_or_path!r} is neither a preset ({sorted(PRESETS)}) nor a local "
            "directory with config.json (models are never downloaded at run time)"
        )
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config
