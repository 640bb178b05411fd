"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3 attention + routed experts, no shared expert.

HF names experts ``mlp.experts.{e}.{gate,up,down}_proj`` and the router ``mlp.gate``; Megatron
names them ``mlp.experts.local_experts.{e}.linear_fc{1,2}`` and ``mlp.router``. Layers listed in
``mlp_only_layers`` (or skipped by ``decoder_sparse_step``) are dense.
"""

from gmpo_megatron.models.hf_config import moe_layer_pattern
from gmpo_megatron.models.qwen3 import Qwen3Mapping


class Qwen3MoeMapping(Qwen3Mapping):
    model_type = "qwen3_moe"

    def is_moe_layer(self, layer: int) -> bool:
        return moe_layer_pattern(self.config)[layer]

    @property
    def num_experts(self) -> int:
        return int(self.config.num_experts)
