"""Activation recompute (``train.recompute*``): memory for long responses, as Megatron's settings.

Activations grow with the tokens of a micro-batch, and RL responses are long (the paper's 3000,
DAPO's 8192 tokens). Recompute keeps less of the forward and runs part of it again in the backward
pass; the gradients are the same (bit-identical in fp32 on CPU; ``layernorm`` sums two gradient
branches in another order, within 1e-6: tests/megatron/test_recompute.py).

- ``full``: whole transformer layers are checkpointed (only their inputs are kept).
  ``uniform``: the layers of each pipeline stage are cut into chunks of ``recompute_num_layers``
  (default 1), every chunk checkpointed; ``block``: only the first ``recompute_num_layers`` layers
  of each stage are, the others keep their activations (use the memory you have, recompute the rest).
- ``selective``: the listed submodules of every layer (``recompute_modules``, default
  ``[core_attn]``): ``core_attn`` the attention scores (quadratic in the sequence length),
  ``layernorm`` the two norms of each layer, ``mlp`` dense MLPs, ``moe`` whole MoE layers (router,
  dispatch, experts), ``moe_act`` the activation inside grouped-GEMM experts (TE spec only).

Megatron-Core 0.16.1 also knows ``mla_up_proj`` (multi-latent attention) and ``shared_experts``,
which no supported Qwen model has: asked for, they are refused rather than silently doing nothing.
Routing replay and the expert-load metrics take the router's re-run in the backward pass into
account (``routing_replay.py``, ``expert_load.py``).

This module imports nothing from megatron-core at import time: the config validates with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

GRANULARITIES = ("none", "selective", "full")
METHODS = ("uniform", "block")
MODULES = ("core_attn", "layernorm", "mlp", "moe", "moe_act")
_NOT_IN_QWEN = {
    "mla_up_proj": "recomputes multi-latent attention's up projection; Qwen models have standard "
                   "attention",
    "shared_experts": "recomputes shared experts; Qwen3-MoE has none (shared-expert models are "
                      "refused by the model builder)",
}


def check_recompute(granularity: str, method: str | None, num_layers: int | None,
                    modules: Sequence[str] | None) -> None:
    """Refuse combinations that Megatron would reject or silently ignore (config keys named)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"train.recompute={granularity!r}: allowed {', '.join(GRANULARITIES)}")
    if method is not None and method not in METHODS:
        raise ValueError(f"train.recompute_method={method!r}: allowed {', '.join(METHODS)}")
    if num_layers is not None and num_layers < 1:
        raise ValueError(f"train.recompute_num_layers={num_layers}: must be at least 1")
    given = [k for k, v in (("recompute_method", method), ("recompute_num_layers", num_layers),
                            ("recompute_modules", modules)) if v is not None]
    if granularity == "none":
        if given:
            raise ValueError(f"train.{' / train.'.join(given)} set but train.recompute=none: set "
                             "train.recompute=full or selective, or drop them")
        return
    if granularity == "full":
        if modules is not None:
            raise ValueError("train.recompute_modules chooses submodules for train.recompute=selective; "
                             "train.recompute=full checkpoints whole layers: drop recompute_modules or "
                             "set recompute=selective")
        if method == "block" and num_layers is None:
            raise ValueError("train.recompute_method=block needs train.recompute_num_layers (how many "
                             "layers of each pipeline stage to recompute)")
        if method is None and num_layers is not None:
            raise ValueError("train.recompute_num_layers needs train.recompute_method=uniform (chunk "
                             "size) or block (layers per stage)")
        return
    # selective
    whole = [k for k in given if k != "recompute_modules"]
    if whole:
        raise ValueError(f"train.{' / train.'.join(whole)} apply to train.recompute=full (whole "
                         "layers); selective recomputes train.recompute_modules in every layer: drop "
                         "them or set recompute=full")
    if modules is not None:
        if not modules:
            raise ValueError("train.recompute_modules=[] recomputes nothing: list modules "
                             f"({', '.join(MODULES)}) or set train.recompute=none")
        for name in modules:
            if name in _NOT_IN_QWEN:
                raise ValueError(f"train.recompute_modules: {name!r} {_NOT_IN_QWEN[name]}; allowed: "
                                 f"{', '.join(MODULES)}")
            if name not in MODULES:
                raise ValueError(f"train.recompute_modules: unknown module {name!r}; allowed: "
                                 f"{', '.join(MODULES)}")
        if len(set(modules)) != len(modules):
            raise ValueError(f"train.recompute_modules={list(modules)} lists a module twice")


def recompute_fields(granularity: str, method: str | None, num_layers: int | None,
                     modules: Sequence[str] | None, *, moe_layers: Sequence[bool],
                     grouped_gemm: bool) -> dict[str, Any]:
    """The ``TransformerConfig`` fields for these settings, checked against the model:
    ``moe_layers`` is the per-layer MoE pattern, ``grouped_gemm`` whether experts are TE's
    grouped GEMMs (the TE spec)."""
    check_recompute(granularity, method, num_layers, modules)
    if granularity == "none":
        return dict(recompute_granularity=None, recompute_method=None, recompute_num_layers=None)
    if granularity == "full":
        return dict(recompute_granularity="full", recompute_method=method or "uniform",
                    recompute_num_layers=num_layers or 1)
    chosen = list(modules) if modules is not None else ["core_attn"]
    if "moe" in chosen and not any(moe_layers):
        raise ValueError("train.recompute_modules: 'moe' recomputes MoE layers and this model has "
                         "none; use 'mlp' for its dense MLPs")
    if "mlp" in chosen and all(moe_layers):
        raise ValueError("train.recompute_modules: 'mlp' recomputes dense MLPs and every layer of "
                         "this model is MoE; use 'moe' (the whole MoE layer)")
    if "moe_act" in chosen and not grouped_gemm:
        raise ValueError("train.recompute_modules: 'moe_act' recomputes the activation of "
                         "Transformer-Engine grouped-GEMM experts; without TE (Megatron's local "
                         "spec, SequentialMLP experts) use 'moe'")
    return dict(recompute_granularity="selective", recompute_method=None, recompute_num_layers=None,
                recompute_modules=chosen)


def check_stage_layers(config) -> None:
    """Full recompute against every pipeline stage's layer count: ``uniform`` chunks must tile
    each stage exactly (Megatron indexes past the last layer otherwise), ``block`` must fit the
    largest stage."""
    if config.recompute_granularity != "full":
        return
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    counts = [get_num_layers_to_build(config, pp_rank=r)
              for r in range(config.pipeline_model_parallel_size)]
    n = config.recompute_num_layers
    if config.recompute_method == "uniform":
        bad = [c for c in counts if c % n]
        if bad:
            raise ValueError(f"train.recompute_num_layers={n} with recompute_method=uniform must divide "
                             f"the layers of every pipeline stage ({counts}): choose a divisor of "
                             f"{bad[0]}, e.g. 1")
    elif n > max(counts):
        raise ValueError(f"train.recompute_num_layers={n} with recompute_method=block exceeds the "
                         f"layers of every pipeline stage ({counts}): at most {max(counts)} (all of them)")
