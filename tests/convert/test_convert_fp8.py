"""Block-FP8 export: the format SGLang / vLLM load, within block-FP8 error, the rest untouched."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from gmpo_megatron.convert import fp8
from gmpo_megatron.convert.hf_io import open_hf_checkpoint
from gmpo_megatron.convert.megatron_to_hf import convert_megatron_to_hf
from gmpo_megatron.convert.verify import fp8_error_bound, verify_weights


def test_quantize_matches_the_block_definition():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 200, generator=generator) * torch.logspace(-3, 1, 200)
    weight[128:256, :128] = 0.0  # an all-zero block
    q, scale_inv = fp8.quantize_block_fp8(weight.to(torch.bfloat16))
    assert q.dtype == torch.float8_e4m3fn and q.shape == (300, 200)
    assert scale_inv.dtype == torch.float32 and scale_inv.shape == (3, 2)
    w = weight.to(torch.bfloat16).float()
    for i in range(3):
        for j in range(2):
            block = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            amax = block.abs().max()
            expected = amax / 448.0 if amax > 0 else torch.tensor(1.0)
            assert scale_inv[i, j] == expected
            qb = q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].float()
            assert qb.abs().max() <= 448.0
            # q is the e4m3 rounding of W / scale_inv
            assert torch.equal(qb, (block / scale_inv[i, j]).to(torch.float8_e4m3fn).float())
    assert torch.count_nonzero(q[128:256, :128].float()) == 0
    error = (fp8.dequantize_block_fp8(q, scale_inv) - w).abs()
    assert bool((error <= fp8_error_bound(q, scale_inv)).all())
    assert error.max() / w.abs().max() < 2.0**-4


@pytest.mark.parametrize("name, quantised", [
    ("model.layers.3.self_attn.q_proj.weight", True),
    ("model.layers.3.self_attn.o_proj.weight", True),
    ("model.layers.3.mlp.gate_proj.weight", True),
    ("model.layers.3.mlp.experts.17.down_proj.weight", True),
    ("model.layers.3.mlp.gate.weight", False),  # the router stays bf16
    ("model.layers.3.self_attn.q_norm.weight", False),
    ("model.layers.3.self_attn.q_proj.bias", False),
    ("model.layers.3.input_layernorm.weight", False),
    ("model.embed_tokens.weight", False),
    ("lm_head.weight", False),
])
def test_which_tensors_are_quantised(name, quantised):
    assert fp8.is_quantised(name) is quantised


@pytest.mark.parametrize("kind", ["qwen2", "qwen3_moe"])
def test_fp8_export_format(hf_models, megatron_models, tmp_path, kind):
    out = convert_megatron_to_hf(megatron_models[kind], str(tmp_path / "fp8"), fp8=True,
                                 log=lambda message: None)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    quant = config["quantization_config"]
    assert {k: quant[k] for k in ("quant_method", "fmt", "activation_scheme",
                                  "weight_block_size")} == {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
        "weight_block_size": [128, 128]}
    assert config["dtype"] == "bfloat16"
    not_converted = set(quant["modules_to_not_convert"])
    with open_hf_checkpoint(hf_models[kind]) as ref, open_hf_checkpoint(out) as got:
        names = set(got.keys())
        scales = {n for n in names if n.endswith("_scale_inv")}
        assert names - scales == set(ref.keys())
        for name in ref.keys():
            original = ref.read(name)
            if fp8.is_quantised(name):
                assert got.dtype(name) == torch.float8_e4m3fn
                scale_name = name + "_scale_inv"
                assert scale_name in scales and got.dtype(scale_name) == torch.float32
                rows, cols = original.shape
                assert got.shape(scale_name) == (math.ceil(rows / 128), math.ceil(cols / 128))
                q, scale_inv = got.read(name), got.read(scale_name)
                error = (fp8.dequantize_block_fp8(q, scale_inv) - original.float()).abs()
                assert bool((error <= fp8_error_bound(q, scale_inv)).all()), name
                assert name[: -len(".weight")] not in not_converted
            else:
                assert got.dtype(name) == torch.bfloat16, name
                assert torch.equal(got.read(name), original.to(torch.bfloat16)), name
                if name.endswith(".weight"):
                    assert name[: -len(".weight")] in not_converted, name
        assert len(scales) == sum(fp8.is_quantised(n) for n in ref.keys())
    if kind == "qwen3_moe":
        assert "model.layers.0.mlp.gate" in not_converted
        assert "lm_head" in not_converted
    report = verify_weights(hf_models[kind], other_hf_dir=out)
    assert report.passed and report.fp8_tensors == len(scales), report.summary()


def test_serving_layout_note_for_qwen3_30b_expert_width():
    from convert_helpers import hf_config

    notes = fp8.expert_block_warnings(hf_config("qwen3_moe", moe_intermediate_size=768))
    assert len(notes) == 1 and "[4, 8]" in notes[0]
    assert fp8.expert_block_warnings(hf_config("qwen3")) == []
