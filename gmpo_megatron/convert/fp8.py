"""Block-FP8 export in the format SGLang and vLLM load (``quant_method: fp8``,
``weight_block_size: [128, 128]``: the format of DeepSeek-V3's FP8 checkpoints).

Each quantised linear ``<m>.weight`` ``[out, in]`` becomes ``<m>.weight`` in ``float8_e4m3fn`` and
``<m>.weight_scale_inv`` in float32 ``[ceil(out/128), ceil(in/128)]``, one scale per 128x128 block:

    scale_inv[i, j] = amax(|W[block i, j]|) / 448          (448 = largest finite e4m3 value)
    q[block i, j]   = round_to_e4m3(W[block i, j] / scale_inv[i, j])
    W ~= q * scale_inv                                      (what the serving engine computes)

An all-zero block gets ``scale_inv = 1`` (any scale represents it exactly). Quantised: attention
q/k/v/o and MLP gate/up/down projections of every layer and every expert. Kept in bf16 (listed in
``modules_to_not_convert``): embeddings, ``lm_head``, all norms including q/k norms, the MoE router
``mlp.gate``; biases (Qwen2.5 q/k/v) stay bf16 too.
"""

from __future__ import annotations

import math
import re

import torch

from gmpo_megatron.convert.safetensors_writer import TensorSpec

BLOCK = 128
E4M3_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn
KEPT_DTYPE = torch.bfloat16
SCALE_SUFFIX = "_scale_inv"

_QUANTISED = re.compile(
    r"\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj|mlp\.experts\.\d+\.(gate|up|down)_proj)"
    r"\.weight$"
)


def is_quantised(hf_name: str) -> bool:
    return bool(_QUANTISED.search(hf_name))


def scale_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    out_dim, in_dim = shape
    return math.ceil(out_dim / BLOCK), math.ceil(in_dim / BLOCK)


@torch.no_grad()
def quantize_block_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[out, in]`` weight -> (e4m3 ``[out, in]``, float32 scale_inv ``[ceil(out/128), ceil(in/128)]``)."""
    if weight.dim() != 2:
        raise ValueError(f"block FP8 quantises 2-D weights, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    r_blocks, c_blocks = scale_shape((rows, cols))
    w = weight.float()
    padded = torch.nn.functional.pad(w, (0, c_blocks * BLOCK - cols, 0, r_blocks * BLOCK - rows))
    blocks = padded.view(r_blocks, BLOCK, c_blocks, BLOCK)
    amax = blocks.abs().amax(dim=(1, 3))
    scale_inv = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    scaled = blocks / scale_inv[:, None, :, None]
    q = scaled.clamp_(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
    q = q.view(r_blocks * BLOCK, c_blocks * BLOCK)[:rows, :cols].contiguous()
    return q, scale_inv.contiguous()


def block_scales(scale_inv: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Each block's scale broadcast over its 128x128 elements: ``[out, in]``."""
    rows, cols = shape
    return scale_inv.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:rows, :cols]


def dequantize_block_fp8(q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """Float32 ``q * scale_inv`` with each scale broadcast over its 128x128 block."""
    return q.float() * block_scales(scale_inv, tuple(q.shape))


def fp8_specs(specs: list[TensorSpec]) -> list[TensorSpec]:
    """The output tensor list of an FP8 export, in production order (scale right after weight)."""
    out = []
    for spec in specs:
        if is_quantised(spec.name):
            out.append(TensorSpec(spec.name, spec.shape, FP8_DTYPE))
            out.append(TensorSpec(spec.name + SCALE_SUFFIX, scale_shape(spec.shape), torch.float32))
        else:
            out.append(TensorSpec(spec.name, spec.shape, KEPT_DTYPE))
    return out


def quantization_config(hf_names: list[str]) -> dict:
    """``config.json["quantization_config"]`` for the exported tensor names."""
    kept = []
    for name in hf_names:
        if not is_quantised(name) and name.endswith(".weight"):
            module = name[: -len(".weight")]
            if module not in kept:
                kept.append(module)
    return {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [BLOCK, BLOCK],
        "modules_to_not_convert": kept,
    }


def expert_block_warnings(hf_config, serving_tps: tuple[int, ...] = (1, 2, 4, 8)) -> list[str]:
    """Serving layouts whose per-rank expert FFN width is not a whole number of 128 blocks (block
    FP8 kernels reject them: SGLang and vLLM need each rank's weight shape to divide by the block)."""
    inter = getattr(hf_config, "moe_intermediate_size", None)
    if not inter or not getattr(hf_config, "num_experts", None):
        return []
    bad = [tp for tp in serving_tps if inter % tp or (inter // tp) % BLOCK]
    if not bad:
        return []
    return [f"moe_intermediate_size={inter} split over serving TP {bad} is not a multiple of "
            f"{BLOCK} per rank: serve the experts with expert parallelism (SGLang --ep-size) or a "
            "TP that keeps whole blocks"]
