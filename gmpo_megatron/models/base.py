"""HF <-> Megatron tensor mapping for Qwen-family decoders: the shared part.

A mapping works on **full, global** Megatron tensors under canonical names (local-spec names, global
layer and expert indices, no ``module.`` prefix), e.g.::

    decoder.layers.7.self_attention.linear_qkv.weight
    decoder.layers.7.mlp.experts.local_experts.113.linear_fc1.weight   (113 = global expert id)

Sharding (TP/ETP splits, EP expert ranges, PP layer ranges) is Megatron's business and lives in
``gmpo_megatron.megatron.weights``; name translation from live or Transformer-Engine names to
canonical names is ``canonical_name``. Converters and weight sync both go through this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from gmpo_megatron.models.hf_config import head_dim

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# Transformer-Engine spec names -> local spec names (TE fuses the norms into the next linear).
_TE_TO_LOCAL = (
    (re.compile(r"self_attention\.linear_qkv\.layer_norm_weight$"), "input_layernorm.weight"),
    (re.compile(r"mlp\.linear_fc1\.layer_norm_weight$"), "pre_mlp_layernorm.weight"),
    (re.compile(r"mlp\.experts\.linear_fc(\d)\.weight(\d+)$"),
     r"mlp.experts.local_experts.\2.linear_fc\1.weight"),
)


def canonical_name(name: str) -> str | None:
    """Strip wrapper prefixes and translate TE names; None for non-weights (``_extra_state``)."""
    if name.endswith("_extra_state"):
        return None
    while name.startswith("module."):
        name = name[len("module."):]
    match = _LAYER.match(name)
    if match:
        rest = match.group(2)
        for pattern, repl in _TE_TO_LOCAL:
            if pattern.search(rest):
                rest = pattern.sub(repl, rest)
                break
        name = f"decoder.layers.{match.group(1)}.{rest}"
    return name


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_groups: int) -> torch.Tensor:
    """HF q/k/v projections -> Megatron fused QKV ``[ng * (heads/ng + 2) * head_dim, ...]``.

    Megatron orders rows per KV group: the group's query heads, then its key head, then its value
    head. Whole groups are contiguous, so a plain dim-0 chunk is a correct tensor-parallel shard.
    Works for weights ``[out, in]`` and biases ``[out]``.
    """
    rest = q.shape[1:]
    qg = q.reshape(num_groups, -1, *rest)
    kg = k.reshape(num_groups, -1, *rest)
    vg = v.reshape(num_groups, -1, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, num_heads: int, num_groups: int, head_dim: int):
    """Inverse of :func:`interleave_qkv`: returns (q, k, v) in HF layout."""
    rest = qkv.shape[1:]
    per_group = num_heads // num_groups
    grouped = qkv.reshape(num_groups, (per_group + 2) * head_dim, *rest)
    q, k, v = torch.split(grouped, [per_group * head_dim, head_dim, head_dim], dim=1)
    return (q.reshape(-1, *rest).contiguous(), k.reshape(-1, *rest).contiguous(),
            v.reshape(-1, *rest).contiguous())


@dataclass(frozen=True)
class HFTensorGroup:
    """One Megatron tensor and the HF tensors it is made from."""

    megatron_name: str
    hf_names: tuple[str, ...]


class QwenMapping:
    """Mapping for the Qwen decoder family; subclasses set the architecture's switches."""

    model_type: str = ""
    qkv_bias: bool = False
    qk_norm: bool = False

    def __init__(self, hf_config) -> None:
        self.config = hf_config
        self.num_layers = hf_config.num_hidden_layers
        self.num_heads = hf_config.num_attention_heads
        self.num_groups = hf_config.num_key_value_heads
        self.head_dim = head_dim(hf_config)
        self.tied = bool(getattr(hf_config, "tie_word_embeddings", False))

    # -- which layers are MoE (dense architectures: none) -----------------------------------
    def is_moe_layer(self, layer: int) -> bool:
        return False

    @property
    def num_experts(self) -> int:
        return 0

    # -- the list of tensor groups (the whole model, in a stable order) ---------------------
    def groups(self) -> list[HFTensorGroup]:
        out = [HFTensorGroup("embedding.word_embeddings.weight", ("model.embed_tokens.weight",))]
        for layer in range(self.num_layers):
            out.extend(self.layer_groups(layer))
        out.append(HFTensorGroup("decoder.final_layernorm.weight", ("model.norm.weight",)))
        if not self.tied:
            out.append(HFTensorGroup("output_layer.weight", ("lm_head.weight",)))
        return out

    def layer_groups(self, layer: int) -> list[HFTensorGroup]:
        m, h = f"decoder.layers.{layer}.", f"model.layers.{layer}."
        attn = f"{h}self_attn."
        out = [
            HFTensorGroup(m + "input_layernorm.weight", (h + "input_layernorm.weight",)),
            HFTensorGroup(m + "self_attention.linear_qkv.weight",
                          tuple(f"{attn}{p}_proj.weight" for p in "qkv")),
            HFTensorGroup(m + "self_attention.linear_proj.weight", (attn + "o_proj.weight",)),
            HFTensorGroup(m + "pre_mlp_layernorm.weight", (h + "post_attention_layernorm.weight",)),
        ]
        if self.qkv_bias:
            out.append(HFTensorGroup(m + "self_attention.linear_qkv.bias",
                                     tuple(f"{attn}{p}_proj.bias" for p in "qkv")))
        if self.qk_norm:
            out.append(HFTensorGroup(m + "self_attention.q_layernorm.weight", (attn + "q_norm.weight",)))
            out.append(HFTensorGroup(m + "self_attention.k_layernorm.weight", (attn + "k_norm.weight",)))
        if self.is_moe_layer(layer):
            out.append(HFTensorGroup(m + "mlp.router.weight", (h + "mlp.gate.weight",)))
            for e in range(self.num_experts):
                me, he = f"{m}mlp.experts.local_experts.{e}.", f"{h}mlp.experts.{e}."
                out.append(HFTensorGroup(me + "linear_fc1.weight",
                                         (he + "gate_proj.weight", he + "up_proj.weight")))
                out.append(HFTensorGroup(me + "linear_fc2.weight", (he + "down_proj.weight",)))
        else:
            out.append(HFTensorGroup(m + "mlp.linear_fc1.weight",
                                     (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight")))
            out.append(HFTensorGroup(m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",)))
        return out

    def group_of(self, megatron_name: str) -> HFTensorGroup:
        """The group of one canonical Megatron name (raises KeyError naming it if unknown)."""
        index = self._index()
        if megatron_name not in index:
            raise KeyError(
                f"{megatron_name!r} is not a tensor of this {self.model_type} model (config: "
                f"{self.num_layers} layers, {self.num_experts} experts, tied={self.tied})"
            )
        return index[megatron_name]

    def _index(self) -> dict[str, HFTensorGroup]:
        if not hasattr(self, "_index_cache"):
            self._index_cache = {g.megatron_name: g for g in self.groups()}
        return self._index_cache

    def hf_names(self) -> list[str]:
        return [n for g in self.groups() for n in g.hf_names]

    # -- the transforms ---------------------------------------------------------------------
    def to_megatron(self, megatron_name: str, hf_tensors: list[torch.Tensor]) -> torch.Tensor:
        """HF tensors (in ``group_of(name).hf_names`` order) -> the full Megatron tensor."""
        if megatron_name.endswith(("linear_qkv.weight", "linear_qkv.bias")):
            q, k, v = hf_tensors
            return interleave_qkv(q, k, v, self.num_groups)
        if megatron_name.endswith("linear_fc1.weight"):
            gate, up = hf_tensors
            return torch.cat([gate, up], dim=0)
        (tensor,) = hf_tensors
        return tensor

    def to_hf(self, megatron_name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """The full Megatron tensor -> its HF tensors, named."""
        group = self.group_of(megatron_name)
        if megatron_name.endswith(("linear_qkv.weight", "linear_qkv.bias")):
            parts = split_qkv(tensor, self.num_heads, self.num_groups, self.head_dim)
        elif megatron_name.endswith("linear_fc1.weight"):
            parts = tuple(t.contiguous() for t in torch.chunk(tensor, 2, dim=0))
        else:
            parts = (tensor,)
        return list(zip(group.hf_names, parts))

    def expected_hf_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes every HF tensor must have for this config (used to refuse bad checkpoints)."""
        c = self.config
        hidden, vocab = c.hidden_size, c.vocab_size
        q_out, kv_out = self.num_heads * self.head_dim, self.num_groups * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {}
        for name in self.hf_names():
            if name == "model.embed_tokens.weight" or name == "lm_head.weight":
                shapes[name] = (vocab, hidden)
            elif name.endswith(("layernorm.weight", "model.norm.weight")):
                shapes[name] = (hidden,)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                shapes[name] = (self.head_dim,)
            elif name.endswith("q_proj.weight"):
                shapes[name] = (q_out, hidden)
            elif name.endswith(("k_proj.weight", "v_proj.weight")):
                shapes[name] = (kv_out, hidden)
            elif name.endswith("q_proj.bias"):
                shapes[name] = (q_out,)
            elif name.endswith(("k_proj.bias", "v_proj.bias")):
                shapes[name] = (kv_out,)
            elif name.endswith("o_proj.weight"):
                shapes[name] = (hidden, q_out)
            elif name.endswith("mlp.gate.weight"):
                shapes[name] = (self.num_experts, hidden)
            elif ".experts." in name:
                inter = c.moe_intermediate_size
                shapes[name] = (hidden, inter) if name.endswith("down_proj.weight") else (inter, hidden)
            elif name.endswith("down_proj.weight"):
                shapes[name] = (hidden, c.intermediate_size)
            else:  # dense gate/up
                shapes[name] = (c.intermediate_size, hidden)
        return shapes
