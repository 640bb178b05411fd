"""Facts read off an HF config the same way by every consumer: the mappings, the converters'
checks and the Megatron model builder (which depends on this module, never the reverse)."""

from __future__ import annotations


def head_dim(hf_config) -> int:
    """Per-head width: ``head_dim`` when the config has one (Qwen3: != hidden / heads)."""
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def moe_layer_pattern(hf_config) -> list[bool]:
    """Which layers are MoE, by the HF rule (``decoder_sparse_step`` and ``mlp_only_layers``)."""
    num_layers = hf_config.num_hidden_layers
    if not getattr(hf_config, "num_experts", None):
        return [False] * num_layers
    step = getattr(hf_config, "decoder_sparse_step", 1) or 1
    dense = set(getattr(hf_config, "mlp_only_layers", None) or [])
    return [(i not in dense) and ((i + 1) % step == 0) for i in range(num_layers)]


def rope_type_and_theta(hf_config) -> tuple[str, float | None]:
    """(rope type, rope base or None); transformers 5 keeps both in ``rope_parameters``."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type")) or scaling.get("rope_type") or "default"
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    return rope_type, (float(theta) if theta is not None else None)


def rope_theta(hf_config) -> float:
    """The rope base of a config with the default rotary embedding (others are refused)."""
    rope_type, theta = rope_type_and_theta(hf_config)
    if rope_type != "default":
        raise ValueError(
            f"rope type {rope_type!r} is not supported yet (only the default rotary embedding, as in "
            "Qwen3 / Qwen2.5 base configs): remove rope scaling from the config"
        )
    if theta is None:
        raise ValueError("the HF config has no rope_theta (neither top level nor rope_parameters)")
    return theta
