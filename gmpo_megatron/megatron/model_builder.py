"""Build a Megatron-Core ``GPTModel`` for a Qwen model from its Hugging Face config.

One function chooses everything from data: the ``TransformerConfig`` is derived from the HF config
plus our parallel / precision / MoE settings, and the layer spec is Transformer-Engine's when TE and
CUDA are present, Megatron's local spec (with our sequence-parallel-capable torch norms) otherwise.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

from gmpo_megatron.megatron import cpu_compat
from gmpo_megatron.megatron.recompute import check_stage_layers, recompute_fields
from gmpo_megatron.models import MAPPINGS, get_mapping
from gmpo_megatron.models.hf_config import head_dim as hf_head_dim
from gmpo_megatron.models.hf_config import moe_layer_pattern, rope_theta


@dataclass
class BuildOptions:
    """What the HF config does not say: layout, precision and RL-specific MoE settings."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None
    cp: int = 1
    sequence_parallel: bool | None = None  # None: on when tp > 1 (required by MoE with TP)
    pp_first_stage_layers: int | None = None
    pp_last_stage_layers: int | None = None
    params_dtype: torch.dtype = torch.float32
    fp8: str | None = None  # None | "e4m3" | "hybrid" (Transformer-Engine on Hopper)
    fp8_recipe: str = "tensorwise"
    moe_dispatcher: str = "alltoall"
    moe_aux_loss_coeff: float = 0.0
    moe_z_loss_coeff: float | None = None
    moe_router_dtype: str = "fp32"
    recompute: str = "none"  # "none" | "selective" | "full" (megatron/recompute.py)
    recompute_method: str | None = None  # full: "uniform" (default) | "block"
    recompute_num_layers: int | None = None  # full: chunk size (uniform, default 1) / layers per stage (block)
    recompute_modules: list[str] | None = None  # selective: default ["core_attn"]
    use_te: bool | None = None  # None: TE spec exactly when TE imports and CUDA is present
    meta_device: bool = False
    """Build on ``torch.device("meta")``: shapes only, no memory (parameter counts and checkpoint
    structure of full-size models; a 235B model builds in ~3 s in ~0.55 GB). Initialisation is off
    and parameters are created the CPU-init way, without an explicit device, so the meta context
    applies on GPU machines too: Megatron's GPU path and Transformer-Engine modules pass
    ``device=cuda`` (or ``cpu``) explicitly, which would allocate the full model, and its CPU-init
    path with initialisation on allocates full master weights. Hence the local spec (same
    parameter shapes as TE's). A meta model cannot run; without TP init the shard tags are absent."""
    extra: dict[str, Any] = field(default_factory=dict)


def _use_te(opts: BuildOptions) -> bool:
    if opts.meta_device:
        if opts.use_te:
            raise ValueError("meta_device=True builds the local spec (TE modules allocate on an "
                             "explicit device): leave use_te unset or False")
        return False
    return opts.use_te if opts.use_te is not None else te_available()


def te_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def transformer_config(hf_config, opts: BuildOptions):
    """The Megatron ``TransformerConfig`` equivalent to ``hf_config`` under ``opts``."""
    from megatron.core.transformer import TransformerConfig

    model_type = hf_config.model_type
    if model_type not in MAPPINGS:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {sorted(MAPPINGS)}")
    if getattr(hf_config, "shared_expert_intermediate_size", 0):
        raise ValueError("shared experts (Qwen2-MoE) are not supported; Qwen3-MoE has none")
    heads, groups = hf_config.num_attention_heads, hf_config.num_key_value_heads
    head_dim = hf_head_dim(hf_config)
    is_moe = any(moe_layer_pattern(hf_config))
    tp, etp = opts.tp, (opts.tp if opts.etp is None else opts.etp)
    _validate_layout(hf_config, opts, heads, groups, is_moe)
    sequence_parallel = opts.sequence_parallel if opts.sequence_parallel is not None else tp > 1
    if is_moe and tp > 1 and not sequence_parallel:
        raise ValueError("MoE with tensor parallelism needs sequence parallelism: set "
                         "parallel.sequence_parallel=true (or leave it unset)")
    bf16 = opts.params_dtype == torch.bfloat16
    kwargs: dict[str, Any] = dict(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=head_dim,  # Qwen3: head_dim != hidden / heads
        ffn_hidden_size=getattr(hf_config, "intermediate_size", None) or hf_config.hidden_size * 4,
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=bool(get_mapping(hf_config).qkv_bias),
        qk_layernorm=bool(get_mapping(hf_config).qk_norm),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=getattr(hf_config, "initializer_range", 0.02),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=opts.pp,
        expert_model_parallel_size=opts.ep,
        expert_tensor_parallel_size=etp,
        context_parallel_size=opts.cp,
        sequence_parallel=sequence_parallel,
        num_layers_in_first_pipeline_stage=opts.pp_first_stage_layers,
        num_layers_in_last_pipeline_stage=opts.pp_last_stage_layers,
        params_dtype=opts.params_dtype,
        pipeline_dtype=opts.params_dtype,
        bf16=bf16,
        attention_softmax_in_fp32=True,
        use_cpu_initialization=not torch.cuda.is_available(),
        # Megatron tags tensor-parallel shards (tensor_model_parallel, partition_dim) inside its init
        # functions: without initialisation the tags are missing and TP shards are taken for
        # duplicates (wrong grad norm). The values are overwritten from an HF state dict anyway.
        perform_initialization=True,
        calculate_per_token_loss=True,  # exact global normalisation: see megatron/train_step.py
        # Micro-batches differ in length; only pipeline p2p needs to be told (shapes are sent).
        variable_seq_lengths=opts.pp > 1,
        moe_token_dispatcher_type=opts.moe_dispatcher,
        # Fusions need apex / TE kernels; the local spec runs the plain torch paths.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        bias_dropout_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )
    kwargs.update(recompute_fields(
        opts.recompute, opts.recompute_method, opts.recompute_num_layers, opts.recompute_modules,
        moe_layers=moe_layer_pattern(hf_config), grouped_gemm=is_moe and _use_te(opts)))
    if is_moe:
        pattern = moe_layer_pattern(hf_config)
        kwargs.update(
            num_moe_experts=hf_config.num_experts,
            moe_router_topk=hf_config.num_experts_per_tok,
            moe_ffn_hidden_size=hf_config.moe_intermediate_size,
            moe_layer_freq=[1 if m else 0 for m in pattern],
            # norm_topk_prob=True (Qwen3): softmax over the top-k logits == renormalised top-k of
            # the full softmax, i.e. Megatron's pre_softmax=False.
            moe_router_pre_softmax=not getattr(hf_config, "norm_topk_prob", True),
            moe_router_load_balancing_type="aux_loss" if opts.moe_aux_loss_coeff > 0 else "none",
            moe_aux_loss_coeff=opts.moe_aux_loss_coeff,
            moe_z_loss_coeff=opts.moe_z_loss_coeff,
            moe_router_dtype=opts.moe_router_dtype,
            moe_grouped_gemm=_use_te(opts),
            moe_permute_fusion=False,
            moe_router_bias_update_rate=0.0,
        )
    kwargs.update(fp8_settings(opts))
    if opts.meta_device:  # see BuildOptions.meta_device
        kwargs.update(use_cpu_initialization=True, perform_initialization=False)
    kwargs.update(opts.extra)
    config = TransformerConfig(**kwargs)
    check_stage_layers(config)
    return config


FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("tensorwise", "blockwise", "delayed")


def fp8_settings(opts: BuildOptions) -> dict[str, Any]:
    """The TransformerConfig fields for FP8 training (Transformer-Engine), validated.

    FP8 GEMMs keep bf16 parameters with fp32 master weights in the optimizer, so fp32 params are
    refused. Blockwise scaling on Hopper needs ``NVTE_FP8_BLOCK_SCALING_FP32_SCALES=1``
    (Transformer-Engine reads it; slime's Hopper blockwise recipes set it too), set here unless
    the user set it."""
    if opts.fp8 is None:
        return {}
    if opts.fp8 not in FP8_FORMATS or opts.fp8_recipe not in FP8_RECIPES:
        raise ValueError(f"precision.fp8={opts.fp8!r} / fp8_recipe={opts.fp8_recipe!r}: allowed "
                         f"formats {FP8_FORMATS}, recipes {FP8_RECIPES}")
    if not te_available():
        raise ValueError(
            f"precision.fp8={opts.fp8!r} needs Transformer-Engine on a CUDA GPU (Hopper or "
            "newer): install the 'gpu' extra in the CUDA image, or set precision.fp8=null"
        )
    if opts.params_dtype != torch.bfloat16:
        raise ValueError("precision.fp8 trains bf16 parameters (fp32 master weights in the "
                         "optimizer): set precision.params_dtype=bf16")
    if opts.fp8_recipe == "blockwise":
        import os

        os.environ.setdefault("NVTE_FP8_BLOCK_SCALING_FP32_SCALES", "1")
    return {"fp8": opts.fp8, "fp8_recipe": opts.fp8_recipe}


def _validate_layout(hf_config, opts: BuildOptions, heads: int, groups: int, is_moe: bool) -> None:
    problems = []
    if heads % opts.tp:
        problems.append(f"num_attention_heads={heads} is not divisible by parallel.tp={opts.tp}")
    if groups % opts.tp:
        problems.append(
            f"num_key_value_heads={groups} is not divisible by parallel.tp={opts.tp} (KV groups are "
            f"never split): use a tp that divides {groups}"
        )
    if hf_config.vocab_size % opts.tp:
        problems.append(f"vocab_size={hf_config.vocab_size} is not divisible by parallel.tp={opts.tp}")
    if is_moe:
        if hf_config.num_experts % opts.ep:
            problems.append(f"num_experts={hf_config.num_experts} is not divisible by "
                            f"parallel.ep={opts.ep}")
        etp = opts.tp if opts.etp is None else opts.etp
        if hf_config.moe_intermediate_size % etp:
            problems.append(f"moe_intermediate_size={hf_config.moe_intermediate_size} is not "
                            f"divisible by parallel.etp={etp}")
    elif opts.ep != 1:
        problems.append(f"parallel.ep={opts.ep} but the model has no experts: set parallel.ep=1")
    if hf_config.num_hidden_layers < opts.pp:
        problems.append(f"{hf_config.num_hidden_layers} layers cannot fill parallel.pp={opts.pp} stages")
    if is_moe and opts.moe_dispatcher == "allgather" and opts.pp > 1:
        problems.append(
            "the allgather MoE dispatcher does not support variable sequence lengths, which "
            "pipeline parallelism needs here: use parallel.moe_dispatcher=alltoall with parallel.pp > 1"
        )
    if opts.moe_dispatcher not in ("alltoall", "allgather"):
        problems.append(f"moe dispatcher {opts.moe_dispatcher!r} is not one of alltoall, allgather")
    if problems:
        raise ValueError("invalid parallel layout for this model:\n  - " + "\n  - ".join(problems))


def layer_spec(config, use_te: bool, is_moe_layer: bool):
    """The ModuleSpec of one transformer layer: TE when asked, local with torch norms otherwise
    (and, under context parallelism, the local spec's CP attention: ``cp_attention.py``)."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    num_experts = config.num_moe_experts if is_moe_layer else None
    if use_te:
        return specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=config.moe_grouped_gemm,
            qk_layernorm=config.qk_layernorm,
        )
    spec = specs.get_gpt_layer_local_spec(
        num_experts=num_experts, moe_grouped_gemm=False, qk_layernorm=config.qk_layernorm,
        normalization="RMSNorm",
    )
    if config.context_parallel_size > 1:
        # Megatron's local DotProductAttention refuses CP; TE's does CP itself (above)
        from gmpo_megatron.megatron.cp_attention import ContextParallelDotProductAttention

        spec.submodules.self_attention.submodules.core_attention = ContextParallelDotProductAttention
    return _with_torch_norms(spec)


def _with_torch_norms(spec):
    from gmpo_megatron.megatron.norms import TorchNorm, TorchQKNorm

    sub = spec.submodules
    sub.input_layernorm = TorchNorm
    sub.pre_mlp_layernorm = TorchNorm
    attn = sub.self_attention.submodules
    if getattr(attn, "q_layernorm", None) is not None and _is_norm(attn.q_layernorm):
        attn.q_layernorm = TorchQKNorm
        attn.k_layernorm = TorchQKNorm
    return spec


def _is_norm(module) -> bool:
    from megatron.core.transformer.identity_op import IdentityOp

    return module is not IdentityOp


def block_spec(config, use_te: bool, hf_config, vp_stage: int | None = None):
    """Per-layer specs of this pipeline stage (dense and MoE layers may mix) + the final norm."""
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    pattern = moe_layer_pattern(hf_config)
    specs = [layer_spec(config, use_te, is_moe) for is_moe in pattern]
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm as final_norm
    else:
        from gmpo_megatron.megatron.norms import TorchNorm as final_norm
    return TransformerBlockSubmodules(layer_specs=specs[offset:offset + count], layer_norm=final_norm)


def build_model(hf_config, opts: BuildOptions, *, pre_process: bool | None = None,
                post_process: bool | None = None, vp_stage: int | None = None):
    """``GPTModel`` of this rank's pipeline stage. Parallel state must be initialised first."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    cpu_compat.apply()
    config = transformer_config(hf_config, opts)
    use_te = _use_te(opts)
    if use_te and not te_available():
        raise ValueError("use_te=True needs Transformer-Engine and CUDA; install the 'gpu' extra")
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=True)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=True)
    # meta_device: shapes only (see BuildOptions.meta_device)
    with torch.device("meta") if opts.meta_device else contextlib.nullcontext():
        model = GPTModel(
            config=config,
            transformer_layer_spec=block_spec(config, use_te, hf_config, vp_stage),
            vocab_size=hf_config.vocab_size,
            max_sequence_length=hf_config.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,  # logits stay vocab-sharded: log-probs are computed vocab-parallel
            share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings),
            position_embedding_type="rope",
            rotary_base=rope_theta(hf_config),
            rotary_percent=1.0,
            vp_stage=vp_stage,
        )
    cpu_compat.apply()
    return model
