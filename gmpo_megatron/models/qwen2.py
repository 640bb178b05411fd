"""Qwen2 / Qwen2.5 (dense): QKV bias, no QK-norm; small models tie embeddings."""

from gmpo_megatron.models.base import QwenMapping


class Qwen2Mapping(QwenMapping):
    model_type = "qwen2"
    qkv_bias = True
    qk_norm = False
