"""The lazy HF safetensors reader: layouts it must understand and damage it must refuse."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from gmpo_megatron.convert.errors import ConversionError
from gmpo_megatron.convert.hf_io import open_hf_checkpoint
from gmpo_megatron.models import get_mapping
from convert_helpers import hf_config, make_model


def _all_tensors(directory: str) -> dict[str, torch.Tensor]:
    out = {}
    for name in os.listdir(directory):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "qwen3_moe"])
def test_sharded_checkpoint_reads_every_mapped_tensor_exactly(hf_models, kind):
    directory = hf_models[kind]
    assert os.path.exists(os.path.join(directory, "model.safetensors.index.json"))
    expected = _all_tensors(directory)
    with open_hf_checkpoint(directory) as ckpt:
        assert sorted(ckpt.keys()) == sorted(get_mapping(hf_config(kind)).hf_names())
        for name, tensor in expected.items():
            got = ckpt.read(name)
            assert got.dtype == tensor.dtype and torch.equal(got, tensor), name


def test_single_file_checkpoint(tmp_path):
    model = make_model("qwen3")
    model.save_pretrained(tmp_path, max_shard_size="100MB")
    assert os.listdir(tmp_path).count("model.safetensors") == 1
    with open_hf_checkpoint(str(tmp_path)) as ckpt:
        state = model.state_dict()
        for name in ckpt.keys():
            assert torch.equal(ckpt.read(name), state[name]), name


def test_transformers5_fused_experts_are_split_per_expert(tmp_path):
    """A state dict saved directly holds mlp.experts.gate_up_proj [E, 2I, H] and down_proj
    [E, H, I]; the reader exposes per-expert gate/up/down with gate = rows [:I]."""
    model = make_model("qwen3_moe")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert state["model.layers.0.mlp.experts.gate_up_proj"].shape == (8, 96, 64)
    save_file(state, str(tmp_path / "model.safetensors"))
    inter = hf_config("qwen3_moe").moe_intermediate_size
    with open_hf_checkpoint(str(tmp_path)) as ckpt:
        assert ckpt.fused_layout
        assert sorted(ckpt.keys()) == sorted(get_mapping(hf_config("qwen3_moe")).hf_names())
        for layer in range(2):
            fused = state[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
            down = state[f"model.layers.{layer}.mlp.experts.down_proj"]
            for e in range(8):
                prefix = f"model.layers.{layer}.mlp.experts.{e}."
                assert torch.equal(ckpt.read(prefix + "gate_proj.weight"), fused[e, :inter])
                assert torch.equal(ckpt.read(prefix + "up_proj.weight"), fused[e, inter:])
                assert torch.equal(ckpt.read(prefix + "down_proj.weight"), down[e])


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def test_refuses_index_naming_a_missing_shard(hf_models, tmp_path):
    directory = _copy(hf_models["qwen3"], tmp_path / "m")
    victim = sorted(f for f in os.listdir(directory) if f.startswith("model-"))[1]
    os.remove(os.path.join(directory, victim))
    with pytest.raises(ConversionError, match=victim):
        open_hf_checkpoint(directory)


def test_refuses_index_and_shards_that_disagree(hf_models, tmp_path):
    directory = _copy(hf_models["qwen3"], tmp_path / "m")
    index_path = os.path.join(directory, "model.safetensors.index.json")
    with open(index_path) as f:
        index = json.load(f)
    name = "model.layers.1.self_attn.o_proj.weight"
    del index["weight_map"][name]
    with open(index_path, "w") as f:
        json.dump(index, f)
    with pytest.raises(ConversionError, match=name):
        open_hf_checkpoint(directory)


def test_refuses_truncated_shard(hf_models, tmp_path):
    directory = _copy(hf_models["qwen3"], tmp_path / "m")
    shard = os.path.join(directory, sorted(f for f in os.listdir(directory)
                                           if f.startswith("model-"))[0])
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 100)
    with pytest.raises(ConversionError, match="truncated or corrupt"):
        open_hf_checkpoint(directory)


def test_refuses_a_tensor_stored_twice(tmp_path):
    model = make_model("qwen3_moe")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["model.layers.0.mlp.experts.3.up_proj.weight"] = torch.zeros(48, 64)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"experts\.3\.up_proj\.weight appears twice"):
        open_hf_checkpoint(str(tmp_path))


def test_refuses_ambiguous_unindexed_shards_and_bin_files(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "a.safetensors"))
    save_file({"b": torch.zeros(2)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(ConversionError, match="no model.safetensors.index.json"):
        open_hf_checkpoint(str(tmp_path))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    torch.save({}, bin_dir / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="pytorch_model.bin"):
        open_hf_checkpoint(str(bin_dir))
