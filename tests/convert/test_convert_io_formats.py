"""The streaming safetensors writer and the torch_dist reader on their own."""

from __future__ import annotations

import json
import os

import pytest
import torch
from convert_helpers import assert_same_tensors, hf_config
from safetensors.torch import load_file

from gmpo_megatron.convert.errors import ConversionError
from gmpo_megatron.convert.megatron_to_hf import convert_megatron_to_hf
from gmpo_megatron.convert.safetensors_writer import (
    ShardedSafetensorsWriter,
    TensorSpec,
    parse_size,
)
from gmpo_megatron.convert.torch_dist_reader import TorchDistCheckpoint


def _specs():
    return [TensorSpec("b.weight", (10, 10), torch.float32), TensorSpec("a.weight", (5,), torch.bfloat16),
            TensorSpec("c.weight", (40, 10), torch.float32), TensorSpec("d.q", (3, 3), torch.float8_e4m3fn)]


def test_writer_shards_as_planned_and_files_load_with_safetensors(tmp_path):
    specs = _specs()
    writer = ShardedSafetensorsWriter(str(tmp_path), specs, max_shard_bytes=500)
    tensors = {s.name: torch.randn(s.shape).to(s.dtype) for s in specs}
    for spec in specs:
        writer.write(spec.name, tensors[spec.name])
        # a shard is closed (complete on disk) once its last tensor is written
    files = writer.finish()
    assert files == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                     "model-00003-of-00003.safetensors"]
    with open(tmp_path / "model.safetensors.index.json") as f:
        index = json.load(f)
    assert index["metadata"]["total_size"] == sum(s.nbytes for s in specs)
    loaded = {}
    for name in files:
        loaded.update(load_file(str(tmp_path / name)))
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name].view(torch.uint8), tensor.view(torch.uint8))
        assert index["weight_map"][name] in files


def test_writer_refuses_out_of_plan_tensors(tmp_path):
    writer = ShardedSafetensorsWriter(str(tmp_path), _specs())
    with pytest.raises(ConversionError, match="plan expected b.weight"):
        writer.write("a.weight", torch.zeros(5, dtype=torch.bfloat16))
    writer.write("b.weight", torch.zeros(10, 10))
    with pytest.raises(ConversionError, match=r"\(5,\) torch.bfloat16"):
        writer.write("a.weight", torch.zeros(5))
    with pytest.raises(ConversionError, match="before writing 3 planned tensors"):
        writer.finish()
    writer.close()


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("1234") == 1234


def _save_model(model, directory, metadata=None):
    from megatron.core import dist_checkpointing

    os.makedirs(directory)
    dist_checkpointing.save(model.sharded_state_dict(metadata=metadata), str(directory))


def test_reader_understands_singleton_expert_keys_and_vocab_padding(hf_models, tmp_path):
    """Trainer checkpoints may use ``singleton_local_shards`` (one key per expert) and a padded
    vocab (Megatron-LM pads to a multiple of 128*TP): read both, drop the padding rows."""
    from gmpo_megatron.convert.hf_io import open_hf_checkpoint
    from gmpo_megatron.convert.hf_to_megatron import _ensure_process_group
    from gmpo_megatron.megatron.model_builder import BuildOptions, build_model
    from gmpo_megatron.megatron.parallel import init_distributed
    from gmpo_megatron.megatron.weights import load_hf_weights
    from gmpo_megatron.models import get_mapping

    _ensure_process_group()
    init_distributed()
    padded = hf_config("qwen3_moe", vocab_size=128)
    model = build_model(padded, BuildOptions())
    config = hf_config("qwen3_moe")
    with open_hf_checkpoint(hf_models["qwen3_moe"]) as ckpt:
        def read(name):
            tensor = ckpt.read(name)
            if name in ("model.embed_tokens.weight", "lm_head.weight"):  # pad 64 -> 128 rows
                tensor = torch.cat([tensor, torch.full((64, tensor.shape[1]), 7.0)])
            return tensor
        mapping = get_mapping(padded)
        load_hf_weights(model, mapping, read)
    ckpt_dir = tmp_path / "trainer_ckpt"
    _save_model(model, ckpt_dir, metadata={"singleton_local_shards": True})

    reader = TorchDistCheckpoint(str(ckpt_dir), vocab_size=config.vocab_size)
    stored = reader.tensors["decoder.layers.1.mlp.experts.local_experts.6.linear_fc2.weight"]
    assert stored.fqn == "decoder.layers.1.mlp.experts.experts.6.linear_fc2.weight"
    embedding = reader.tensors["embedding.word_embeddings.weight"]
    assert embedding.shape == (64, 64) and embedding.stored_rows == 128

    config_dir = tmp_path / "config"
    config.save_pretrained(config_dir)
    out = convert_megatron_to_hf(str(ckpt_dir), str(tmp_path / "out"),
                                 hf_config_dir=str(config_dir), dtype="float32",
                                 log=lambda message: None)
    assert_same_tensors(hf_models["qwen3_moe"], out)


def test_direct_chunk_reads_equal_dcp_reads(megatron_models, monkeypatch):
    """Whole stored chunks are read straight into place; the result is what DCP's own reader
    (torch.load + copy) gives, bit for bit."""
    fast = TorchDistCheckpoint(megatron_models["qwen3_moe"])
    names = sorted(fast.tensors)
    direct = fast.read(names)
    assert fast.dcp_reads == 0 and fast.direct_reads > len(names)  # fc1 = 2 chunks
    monkeypatch.setattr(TorchDistCheckpoint, "_read_direct", lambda self, item, targets: False)
    slow = TorchDistCheckpoint(megatron_models["qwen3_moe"])
    via_dcp = slow.read(names)
    assert slow.direct_reads == 0
    for name in names:
        assert torch.equal(direct[name], via_dcp[name]), name


def test_trainer_style_checkpoint_with_optimizer_state_exports(hf_models, tmp_path):
    """A training checkpoint nests the model under "model" next to optimizer and RNG state: the
    reader takes the model tensors, lists the rest as ignored, and the export is exact."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    from gmpo_megatron.convert.hf_io import open_hf_checkpoint
    from gmpo_megatron.convert.hf_to_megatron import _ensure_process_group
    from gmpo_megatron.convert.megatron_ckpt import converter_build_options
    from gmpo_megatron.megatron.model_builder import build_model
    from gmpo_megatron.megatron.parallel import init_distributed
    from gmpo_megatron.megatron.weights import load_hf_weights
    from gmpo_megatron.models import get_mapping

    _ensure_process_group()
    init_distributed()
    config = hf_config("qwen3")
    model = build_model(config, converter_build_options())
    with open_hf_checkpoint(hf_models["qwen3"]) as ckpt:
        load_hf_weights(model, get_mapping(config), ckpt.read)
    exp_avg = torch.zeros(64, 96)
    state = {
        "model": model.sharded_state_dict(),
        "optimizer": {"exp_avg": ShardedTensor.from_rank_offsets(
            "optimizer.state.exp_avg.embedding.word_embeddings.weight", exp_avg)},
        "rng": ShardedObject("rng_state", {"seed": 1}, (1,), (0,)),
    }
    step_dir = tmp_path / "step_000010"
    step_dir.mkdir()
    dist_checkpointing.save(state, str(step_dir))

    reader = TorchDistCheckpoint(str(step_dir))
    assert reader.ignored_keys == ["optimizer.state.exp_avg.embedding.word_embeddings.weight"]
    out = convert_megatron_to_hf(str(step_dir), str(tmp_path / "hf"),
                                 hf_config_dir=hf_models["qwen3"], log=lambda message: None)
    assert_same_tensors(hf_models["qwen3"], out)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "qwen3_moe"])
def test_file_to_file_copies_write_the_same_files_as_reading(megatron_models, tmp_path, kind):
    """Tensors that are plain byte ranges of the checkpoint (all but the QKV split) are copied
    file-to-file; the output files are byte-identical to the read-transform-write path."""
    import filecmp

    from gmpo_megatron.convert.staging import read_marker

    copied = convert_megatron_to_hf(megatron_models[kind], str(tmp_path / "copied"),
                                    max_shard_bytes=30_000, log=lambda message: None)
    read = convert_megatron_to_hf(megatron_models[kind], str(tmp_path / "read"),
                                  max_shard_bytes=30_000, byte_copy=False,
                                  log=lambda message: None)
    files = sorted(f for f in os.listdir(read) if f.endswith((".safetensors", ".json"))
                   and f != "gmpo_convert.json")
    assert files == sorted(f for f in os.listdir(copied) if f.endswith((".safetensors", ".json"))
                           and f != "gmpo_convert.json")
    for name in files:
        assert filecmp.cmp(os.path.join(copied, name), os.path.join(read, name), shallow=False)
    qkv_pieces = 6 if kind == "qwen2" else 3  # q, k, v weights (+ biases): split, not copied
    with open(os.path.join(read, "model.safetensors.index.json")) as f:
        total = len(json.load(f)["weight_map"])
    layers = hf_config(kind).num_hidden_layers
    assert read_marker(copied)["tensors_copied_file_to_file"] == total - qkv_pieces * layers
    assert read_marker(read)["tensors_copied_file_to_file"] == 0
