"""Refuse to be wrong: config and tensor checks run before a converter writes anything.

Three kinds of check, each raising :class:`ConversionError` that names every offending field or
tensor (not just the first):

- ``check_hf_config``: the HF config describes a model our Megatron spec reproduces exactly
  (supported architecture, silu, full attention, default rope, no attention bias where the mapping
  has none, ...).
- ``compare_hf_configs`` / ``check_megatron_config``: two descriptions of the same model agree on
  every field that changes the weights' meaning — hidden size, heads, KV groups, head_dim, layers,
  FFN sizes, experts, top-k, top-k renormalisation, rope base, norm eps, tied embeddings, QKV bias,
  QK-norm, vocab. ``check_megatron_config`` reads the *built* Megatron model (its TransformerConfig,
  vocab, embedding tying and rotary inverse frequencies), so a builder regression cannot slip by.
- ``check_hf_tensors`` / ``check_megatron_tensors``: the checkpoint holds exactly the tensors the
  mapping expects, with the expected shapes — missing, unexpected and mis-shaped tensors are named.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from gmpo_megatron.convert.errors import ConversionError
from gmpo_megatron.models import MAPPINGS, get_mapping
from gmpo_megatron.models.base import QwenMapping
from gmpo_megatron.models.hf_config import head_dim, moe_layer_pattern, rope_theta, rope_type_and_theta

_SHOW = 8  # names listed in an error before "... and N more"


# Every field that changes what the weights mean. (label, getter on an HF config)
HF_CONFIG_FIELDS: list[tuple[str, Callable]] = [
    ("model_type", lambda c: c.model_type),
    ("hidden_size", lambda c: c.hidden_size),
    ("num_hidden_layers", lambda c: c.num_hidden_layers),
    ("num_attention_heads", lambda c: c.num_attention_heads),
    ("num_key_value_heads (query groups)", lambda c: c.num_key_value_heads),
    ("head_dim", head_dim),
    ("intermediate_size", lambda c: getattr(c, "intermediate_size", None)),
    ("moe_intermediate_size", lambda c: getattr(c, "moe_intermediate_size", None)),
    ("num_experts", lambda c: getattr(c, "num_experts", None) or 0),
    ("num_experts_per_tok (top-k)", lambda c: getattr(c, "num_experts_per_tok", None)),
    ("norm_topk_prob", lambda c: getattr(c, "norm_topk_prob", None)),
    ("MoE layer pattern (decoder_sparse_step, mlp_only_layers)", moe_layer_pattern),
    ("rope type", lambda c: rope_type_and_theta(c)[0]),
    ("rope_theta (rope base)", lambda c: rope_type_and_theta(c)[1]),
    ("rms_norm_eps", lambda c: float(c.rms_norm_eps)),
    ("tie_word_embeddings", lambda c: bool(getattr(c, "tie_word_embeddings", False))),
    ("QKV bias", lambda c: MAPPINGS[c.model_type].qkv_bias if c.model_type in MAPPINGS else None),
    ("QK-norm", lambda c: MAPPINGS[c.model_type].qk_norm if c.model_type in MAPPINGS else None),
    ("vocab_size", lambda c: c.vocab_size),
    ("hidden_act", lambda c: getattr(c, "hidden_act", None)),
]


def _raise(title: str, problems: list[str]) -> None:
    if problems:
        raise ConversionError(title + ":\n  - " + "\n  - ".join(problems))


def check_hf_config(c) -> None:
    """The config describes a model that the Megatron spec reproduces exactly."""
    problems = []
    if getattr(c, "model_type", None) not in MAPPINGS:
        _raise("unsupported HF config", [f"model_type={getattr(c, 'model_type', None)!r}; "
                                         f"supported: {sorted(MAPPINGS)}"])
    if getattr(c, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={c.hidden_act!r}: only 'silu' (SwiGLU) is supported")
    rope_type, theta = rope_type_and_theta(c)
    if rope_type != "default":
        problems.append(f"rope type {rope_type!r}: only the default rotary embedding is supported "
                        "(remove rope scaling from config.json)")
    if theta is None:
        problems.append("no rope_theta (neither top level nor rope_parameters)")
    if getattr(c, "use_sliding_window", False):
        problems.append("use_sliding_window=true: sliding-window attention is not supported")
    layer_types = getattr(c, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        problems.append(f"layer_types contains {sorted(set(layer_types) - {'full_attention'})}: "
                        "only full attention is supported")
    if c.model_type in ("qwen3", "qwen3_moe") and getattr(c, "attention_bias", False):
        problems.append(f"attention_bias=true: {c.model_type} is mapped without attention biases")
    if c.num_attention_heads % c.num_key_value_heads:
        problems.append(f"num_attention_heads={c.num_attention_heads} is not a multiple of "
                        f"num_key_value_heads={c.num_key_value_heads}")
    if getattr(c, "shared_expert_intermediate_size", 0):
        problems.append("shared experts are not supported (Qwen3-MoE has none)")
    for name in ("attention_dropout", "hidden_dropout"):
        if getattr(c, name, 0.0):
            problems.append(f"{name}={getattr(c, name)}: must be 0")
    _raise(f"the HF config ({c.model_type}) cannot be converted exactly", problems)


def compare_hf_configs(expected, actual, expected_what: str, actual_what: str) -> None:
    """Every weight-relevant field of two HF configs agrees (raises naming each mismatch)."""
    problems = []
    for label, get in HF_CONFIG_FIELDS:
        a, b = get(expected), get(actual)
        if a != b:
            problems.append(f"{label}: {expected_what} has {a!r}, {actual_what} has {b!r}")
    _raise(f"{expected_what} and {actual_what} describe different models", problems)


def check_megatron_config(hf_config, model) -> None:
    """The built Megatron model (one pipeline stage) is the model the HF config describes."""
    from gmpo_megatron.megatron.weights import unwrap

    gpt = unwrap(model[0] if isinstance(model, (list, tuple)) else model)
    t = gpt.config
    c = hf_config
    mapping = get_mapping(c)
    pattern = moe_layer_pattern(c)
    expected = {
        "hidden_size": c.hidden_size,
        "num_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_query_groups": c.num_key_value_heads,
        "kv_channels": head_dim(c),
        "layernorm_epsilon": float(c.rms_norm_eps),
        "add_qkv_bias": bool(mapping.qkv_bias),
        "qk_layernorm": bool(mapping.qk_norm),
        "normalization": "RMSNorm",
        "gated_linear_unit": True,
    }
    if any(not m for m in pattern):
        expected["ffn_hidden_size"] = c.intermediate_size
    if any(pattern):
        expected.update(num_moe_experts=c.num_experts, moe_router_topk=c.num_experts_per_tok,
                        moe_ffn_hidden_size=c.moe_intermediate_size,
                        moe_router_pre_softmax=not getattr(c, "norm_topk_prob", True),
                        moe_layer_freq=[1 if m else 0 for m in pattern])
    else:
        expected["num_moe_experts"] = None
    problems = [f"TransformerConfig.{k}={getattr(t, k, None)!r}, HF config implies {v!r}"
                for k, v in expected.items() if getattr(t, k, None) != v]
    if gpt.vocab_size != c.vocab_size:
        problems.append(f"model vocab_size={gpt.vocab_size}, HF vocab_size={c.vocab_size}")
    if bool(gpt.share_embeddings_and_output_weights) != bool(c.tie_word_embeddings):
        problems.append(f"share_embeddings_and_output_weights={gpt.share_embeddings_and_output_weights}"
                        f", HF tie_word_embeddings={c.tie_word_embeddings}")
    rotary = getattr(gpt, "rotary_pos_emb", None)
    if rotary is not None and rotary.inv_freq.is_meta:  # a structure-only (meta-device) model
        if float(getattr(gpt, "rotary_base", rope_theta(c))) != rope_theta(c):
            problems.append(f"rotary_base={gpt.rotary_base}, HF rope_theta={rope_theta(c)}")
    elif rotary is not None:
        dim = head_dim(c)
        inv_freq = 1.0 / (rope_theta(c) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        if rotary.inv_freq.shape != inv_freq.shape or not torch.allclose(
                rotary.inv_freq.float().cpu(), inv_freq, rtol=1e-6, atol=0):
            problems.append(f"rotary inverse frequencies differ from rope_theta={rope_theta(c)} "
                            f"over head_dim={dim}")
    _raise("the Megatron model does not match the HF config", problems)


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOW])
    return shown + (f" ... and {len(names) - _SHOW} more" if len(names) > _SHOW else "")


def check_hf_tensors(ckpt, mapping: QwenMapping) -> None:
    """The HF checkpoint holds exactly the mapping's tensors, with the config's shapes.

    A tied model may carry a redundant ``lm_head.weight``; it is accepted only if it equals the
    embedding bit for bit (it is then ignored), since a differing one means the model is not tied.
    """
    expected = mapping.expected_hf_shapes()
    present = set(ckpt.keys())
    missing = [n for n in expected if n not in present]
    extra = sorted(present - set(expected))
    if mapping.tied and "lm_head.weight" in extra:
        if not torch.equal(ckpt.read("lm_head.weight"), ckpt.read("model.embed_tokens.weight")):
            raise ConversionError(
                "config.json says tie_word_embeddings=true but lm_head.weight differs from "
                "model.embed_tokens.weight: the checkpoint is untied; fix tie_word_embeddings"
            )
        extra.remove("lm_head.weight")
    problems = []
    if missing:
        problems.append(f"missing tensor(s): {_listing(missing)}")
    if extra:
        problems.append(f"unexpected tensor(s) not in the {mapping.model_type} mapping: "
                        f"{_listing(extra)}")
    for name, shape in expected.items():
        if name in present and tuple(ckpt.shape(name)) != shape:
            problems.append(f"tensor {name} has shape {tuple(ckpt.shape(name))}, the config "
                            f"implies {shape}")
        elif name in present and not ckpt.dtype(name).is_floating_point:
            problems.append(f"tensor {name} has dtype {ckpt.dtype(name)}, expected a float dtype")
    _raise(f"the HF checkpoint in {ckpt.directory} does not match its config", problems)


def expected_megatron_shapes(mapping: QwenMapping) -> dict[str, tuple[int, ...]]:
    """Full (unsharded) canonical Megatron shapes implied by the HF config."""
    hf_shapes = mapping.expected_hf_shapes()
    out = {}
    for group in mapping.groups():
        metas = [torch.empty(hf_shapes[n], device="meta") for n in group.hf_names]
        out[group.megatron_name] = tuple(mapping.to_megatron(group.megatron_name, metas).shape)
    return out


def check_megatron_tensors(shapes: Mapping[str, tuple[int, ...]], mapping: QwenMapping,
                           where: str) -> None:
    """A Megatron checkpoint's canonical tensors (``shapes``: name -> full shape, embedding and
    output rows already trimmed of vocab padding) are exactly the mapping's."""
    expected = expected_megatron_shapes(mapping)
    missing = [n for n in expected if n not in shapes]
    extra = sorted(set(shapes) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing tensor(s): {_listing(missing)}")
    if extra:
        problems.append(f"unexpected tensor(s) for this config: {_listing(extra)}")
    for name, shape in expected.items():
        if name in shapes and tuple(shapes[name]) != shape:
            problems.append(f"tensor {name} has shape {tuple(shapes[name])}, the HF config implies "
                            f"{shape}")
    _raise(f"the Megatron checkpoint in {where} does not match the HF config", problems)
