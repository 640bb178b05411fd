"""Tiny Qwen-family HF configs for engine tests (vocab 64 = the task tokenizer's)."""

import transformers

COMMON = dict(vocab_size=64, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, initializer_range=0.3)  # wide init: peaked, non-uniform logits


def tiny_qwen3_moe_config(**overrides) -> transformers.Qwen3MoeConfig:
    # head_dim 16 != hidden/heads = 12, moe_intermediate 20 != hidden 48: every orientation mistake shows.
    return transformers.Qwen3MoeConfig(**{**COMMON, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                                          "moe_intermediate_size": 20, "intermediate_size": 40, **overrides})


def tiny_qwen3_config(**overrides) -> transformers.Qwen3Config:
    return transformers.Qwen3Config(**{**COMMON, "head_dim": 16, "intermediate_size": 40, **overrides})


def tiny_qwen2_tied_config(**overrides) -> transformers.Qwen2Config:
    return transformers.Qwen2Config(**{**COMMON, "intermediate_size": 40, "tie_word_embeddings": True, **overrides})


TINY_CONFIGS = {"qwen3_moe": tiny_qwen3_moe_config, "qwen3": tiny_qwen3_config, "qwen2_tied": tiny_qwen2_tied_config}
