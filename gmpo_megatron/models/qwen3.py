"""Qwen3 (dense): QK-norm (one [head_dim] weight shared by heads), no QKV bias."""

from gmpo_megatron.models.base import QwenMapping


class Qwen3Mapping(QwenMapping):
    model_type = "qwen3"
    qkv_bias = False
    qk_norm = True
