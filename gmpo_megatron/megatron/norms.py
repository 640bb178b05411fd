"""Torch norms for the local (non-Transformer-Engine) layer spec.

Megatron's own ``WrappedTorchNorm`` refuses sequence parallelism. Under sequence parallelism a norm
sees only this rank's slice of the sequence, so its weight gradient is partial and must be summed
over the tensor-parallel group; Megatron's ``finalize_model_grads`` does exactly that for parameters
tagged ``sequence_parallel``. Tagging is all that is missing, so these classes tag and build the
plain torch module. Q/K norms are not tagged: they see whole sequences of this rank's heads, and
``finalize_model_grads`` all-reduces them by name (``q_layernorm`` / ``k_layernorm``).
"""

from __future__ import annotations

import torch


def _build(config, hidden_size: int, eps: float) -> torch.nn.Module:
    if config.layernorm_zero_centered_gamma or config.persist_layer_norm:
        raise ValueError(
            "zero-centred gamma and persist_layer_norm need Transformer-Engine/apex norms; "
            "Qwen models use neither: leave them off"
        )
    if config.normalization == "RMSNorm":
        return torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
    if config.normalization == "LayerNorm":
        return torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
    raise ValueError(f"normalization must be 'RMSNorm' or 'LayerNorm', got {config.normalization!r}")


class TorchNorm:
    """Hidden-size norm (input / pre-MLP / final): weights tagged for sequence parallelism."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused):
        norm = _build(config, hidden_size, eps)
        for param in norm.parameters():
            param.sequence_parallel = bool(config.sequence_parallel)
        return norm


class TorchQKNorm:
    """Per-head Q/K norm (shape [head_dim], shared by all heads)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused):
        return _build(config, hidden_size, eps)
