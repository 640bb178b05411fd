"""Model presets: tiny random configs for the CPU demo and tests, and the real Qwen configs.

The tiny preset has every structural feature of Qwen3-30B-A3B that can break a converter or a
parallel layout: GQA, head_dim != hidden / heads, QK-norm, top-k routing with renormalised
probabilities, untied embeddings.

The full-size presets (``qwen3-30b-a3b``, ``qwen3-235b-a22b``, ``qwen3-32b``, ``qwen2.5-7b``) are
the public ``config.json`` values of those checkpoints (architecture, intermediate_size, rope_theta,
rms_norm_eps, max_position_embeddings, token ids), from the models' published config files; nothing is downloaded. ``PUBLIC_CONFIGS`` holds them in the
file's own layout (flat ``rope_theta``, ``torch_dtype``); ``examples/moe/configs/write_configs.py``
writes them to ``examples/moe/configs/<name>/config.json``, the directory a user can point
``model.hf_config`` at, and a test checks that the files and the presets agree.
"""

from __future__ import annotations

import functools

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


# Shared by the Qwen3 family (dense and MoE): ids, rope, norms, no attention bias, untied (>= 8B).
_QWEN3_COMMON = dict(
    attention_bias=False, attention_dropout=0.0, bos_token_id=151643, eos_token_id=151645,
    head_dim=128, hidden_act="silu", initializer_range=0.02, max_position_embeddings=40960,
    rms_norm_eps=1e-06, rope_scaling=None, rope_theta=1000000.0, sliding_window=None,
    tie_word_embeddings=False, torch_dtype="bfloat16", use_cache=True, use_sliding_window=False,
    vocab_size=151936,
)
_QWEN3_MOE_COMMON = dict(
    _QWEN3_COMMON, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
    decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, num_experts=128,
    num_experts_per_tok=8, output_router_logits=False, router_aux_loss_coef=0.001,
)

PUBLIC_CONFIGS: dict[str, dict] = {
    "qwen3-30b-a3b": dict(
        _QWEN3_MOE_COMMON, hidden_size=2048, intermediate_size=6144, max_window_layers=48,
        moe_intermediate_size=768, num_attention_heads=32, num_hidden_layers=48,
        num_key_value_heads=4,
    ),
    "qwen3-235b-a22b": dict(
        _QWEN3_MOE_COMMON, hidden_size=4096, intermediate_size=12288, max_window_layers=94,
        moe_intermediate_size=1536, num_attention_heads=64, num_hidden_layers=94,
        num_key_value_heads=4,
    ),
    "qwen3-32b": dict(
        _QWEN3_COMMON, architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=5120,
        intermediate_size=25600, max_window_layers=64, num_attention_heads=64,
        num_hidden_layers=64, num_key_value_heads=8,
    ),
    # The base model (the paper's GMPO runs start from Qwen2.5-Math-7B / R1-Distill-Qwen-7B, which
    # share this architecture but not max_position_embeddings / rope_theta: use their own config).
    "qwen2.5-7b": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", attention_dropout=0.0,
        bos_token_id=151643, eos_token_id=151643, hidden_act="silu", hidden_size=3584,
        initializer_range=0.02, intermediate_size=18944, max_position_embeddings=131072,
        max_window_layers=28, num_attention_heads=28, num_hidden_layers=28, num_key_value_heads=4,
        rms_norm_eps=1e-06, rope_scaling=None, rope_theta=1000000.0, sliding_window=131072,
        tie_word_embeddings=False, torch_dtype="bfloat16", use_cache=True, use_sliding_window=False,
        vocab_size=152064,
    ),
}


def public_config(name: str, **overrides):
    """The transformers config of a full-size preset, exactly as ``AutoConfig`` reads its file."""
    from transformers import AutoConfig

    if name not in PUBLIC_CONFIGS:
        raise ValueError(f"no full-size preset {name!r}; available: {sorted(PUBLIC_CONFIGS)}")
    return AutoConfig.for_model(**{**PUBLIC_CONFIGS[name], **overrides})


PRESETS = {
    "tiny-qwen3-moe": tiny_qwen3_moe,
    **{name: functools.partial(public_config, name) for name in PUBLIC_CONFIGS},
}


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
