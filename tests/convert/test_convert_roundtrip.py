"""HF -> Megatron (TP1, one process) -> HF: bit-identical, layout-independent files, logits match.

The multi-process layouts (TP2, PP2, EP2, TP2+EP2) are in test_convert_layouts_mp.py (slow)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from convert_helpers import assert_same_tensors, make_model, run_cli, save_model
from safetensors.torch import load_file, save_file

from gmpo_megatron.convert.cli import main
from gmpo_megatron.convert.hf_io import open_hf_checkpoint
from gmpo_megatron.convert.hf_to_megatron import convert_hf_to_megatron
from gmpo_megatron.convert.megatron_to_hf import convert_megatron_to_hf
from gmpo_megatron.convert.staging import MARKER, read_marker
from gmpo_megatron.convert.torch_dist_reader import TorchDistCheckpoint
from gmpo_megatron.convert.verify import verify_logits, verify_weights

quiet = dict(log=lambda message: None)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "qwen3_moe"])
def test_hf_megatron_hf_is_bit_identical(hf_models, megatron_models, tmp_path, kind):
    megatron_dir = megatron_models[kind]
    marker = read_marker(megatron_dir)
    assert marker["kind"] == "megatron_torch_dist" and marker["params_dtype"] == "float32"
    assert os.path.isfile(os.path.join(megatron_dir, "hf", "config.json"))

    out = convert_megatron_to_hf(megatron_dir, str(tmp_path / "hf"), max_shard_bytes=30_000,
                                 **quiet)
    count = assert_same_tensors(hf_models[kind], out)
    assert count > 10
    files = os.listdir(out)
    for copied in ("config.json", "generation_config.json", "tokenizer_config.json",
                   "chat_template.jinja", "model.safetensors.index.json", MARKER):
        assert copied in files, copied
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    for shard in set(index["weight_map"].values()):  # the safetensors library accepts our files
        assert os.path.getsize(os.path.join(out, shard)) <= 30_000 + 4096 or len(load_file(
            os.path.join(out, shard))) == 1
        load_file(os.path.join(out, shard))
    tied = kind == "qwen2"
    assert ("lm_head.weight" in index["weight_map"]) == (not tied)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no staging leftovers


def test_model_reader_matches_stream_reader(hf_models, megatron_models, tmp_path):
    out = convert_megatron_to_hf(megatron_models["qwen3_moe"], str(tmp_path / "hf"),
                                 reader="model", **quiet)
    assert_same_tensors(hf_models["qwen3_moe"], out)


def test_dense_block_is_stored_stacked_and_moe_block_per_layer(megatron_models):
    """Both dist_checkpointing key layouts occur, and the reader understands both."""
    dense = TorchDistCheckpoint(megatron_models["qwen3"])
    assert "decoder.layers.self_attention.linear_qkv.weight" in dense.metadata.state_dict_metadata
    assert dense.tensors["decoder.layers.1.self_attention.linear_qkv.weight"].index == (1,)
    moe = TorchDistCheckpoint(megatron_models["qwen3_moe"])
    stored = moe.tensors["decoder.layers.1.mlp.experts.local_experts.5.linear_fc1.weight"]
    assert stored.fqn == "decoder.layers.1.mlp.experts.experts.linear_fc1.weight"
    assert stored.index == (5,) and stored.shape == (96, 64)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "qwen3_moe"])
def test_megatron_logits_match_transformers_tp1(hf_models, megatron_models, kind):
    report = verify_logits(hf_models[kind], megatron_models[kind], seq=16)
    assert report.passed, report.summary()
    assert report.max_abs_diff <= 1e-4 and report.max_logprob_diff <= 1e-4


def test_bf16_checkpoint_stays_bf16_and_bit_identical(tmp_path):
    model = make_model("qwen3_moe", seed=3)
    hf_dir = save_model(model, str(tmp_path / "hf_bf16"), dtype=torch.bfloat16)
    megatron_dir = convert_hf_to_megatron(hf_dir, str(tmp_path / "m"), **quiet)
    assert read_marker(megatron_dir)["params_dtype"] == "bfloat16"
    reader = TorchDistCheckpoint(megatron_dir)
    assert {t.dtype for t in reader.tensors.values()} == {torch.bfloat16}
    out = convert_megatron_to_hf(megatron_dir, str(tmp_path / "out"), **quiet)
    assert_same_tensors(hf_dir, out)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    report = verify_weights(hf_dir, megatron_dir=megatron_dir)
    assert report.passed and report.identical == report.compared, report.summary()


def test_mixed_dtypes_are_restored_per_tensor(tmp_path):
    """A bf16 checkpoint with an fp32 router: auto dtype keeps fp32 params (nothing rounded) and
    the export restores each tensor's own dtype."""
    hf_dir = save_model(make_model("qwen3_moe", seed=4), str(tmp_path / "hf"), dtype=torch.bfloat16)
    router = "model.layers.0.mlp.gate.weight"
    for name in os.listdir(hf_dir):
        if name.endswith(".safetensors"):
            tensors = load_file(os.path.join(hf_dir, name))
            if router in tensors:
                tensors[router] = torch.randn(8, 64)
                save_file(tensors, os.path.join(hf_dir, name), metadata={"format": "pt"})
    megatron_dir = convert_hf_to_megatron(hf_dir, str(tmp_path / "m"), **quiet)
    assert read_marker(megatron_dir)["params_dtype"] == "float32"
    out = convert_megatron_to_hf(megatron_dir, str(tmp_path / "out"), **quiet)
    assert_same_tensors(hf_dir, out)
    with open_hf_checkpoint(out) as ckpt:
        assert ckpt.dtype(router) == torch.float32
        assert ckpt.dtype("model.layers.1.mlp.gate.weight") == torch.bfloat16


def test_fused_expert_checkpoint_converts_with_matching_logits(tmp_path):
    """The transformers-5 in-memory layout (gate_up_proj [E, 2I, H]) imports with the right
    orientation: Megatron logits equal transformers' on the same weights."""
    model = make_model("qwen3_moe", seed=5)
    hf_dir = tmp_path / "fused"
    model.save_pretrained(hf_dir)  # config + per-expert files ...
    for name in os.listdir(hf_dir):
        if name.endswith(".safetensors") or name.endswith(".index.json"):
            os.remove(hf_dir / name)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}  # ... replaced by fused
    save_file(state, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    megatron_dir = convert_hf_to_megatron(str(hf_dir), str(tmp_path / "m"), **quiet)
    report = verify_logits(str(hf_dir), megatron_dir, seq=16)
    assert report.passed, report.summary()


def test_cli_round_trip_and_verify_exit_codes(hf_models, tmp_path, capsys):
    """The CLI entry (``gmpo_megatron.convert.cli.main``): convert both ways, verify weights and
    logits (exit 0); a damaged export fails both verifications (exit 1) naming what differs."""
    hf, m, out = hf_models["qwen2"], str(tmp_path / "m"), str(tmp_path / "out")
    assert main(["hf-to-megatron", "--hf-dir", hf, "--out-dir", m]) == 0
    assert main(["megatron-to-hf", "--megatron-dir", m, "--out-dir", out]) == 0
    assert main(["verify", "--mode", "weights", "--hf-dir", hf, "--other-hf-dir", out]) == 0
    assert "PASS weights" in capsys.readouterr().out
    assert main(["verify", "--hf-dir", hf, "--megatron-dir", m, "--seq-len", "16", "--json"]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{"):])["passed"] is True

    shard = os.path.join(out, "model.safetensors")
    tensors = load_file(shard)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.5
    save_file(tensors, shard, metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["verify", "--mode", "weights", "--hf-dir", hf, "--other-hf-dir", out]) == 1
    assert "model.norm.weight" in capsys.readouterr().out
    assert main(["verify", "--hf-dir", out, "--megatron-dir", m, "--seq-len", "16"]) == 1
    assert "FAIL logits" in capsys.readouterr().out


def test_script_entry_point_runs():
    result = run_cli("--help")
    assert result.returncode == 0 and "hf-to-megatron" in result.stdout


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "qwen3_moe"])
def test_stream_writer_matches_a_saved_model(hf_models, megatron_models, tmp_path, kind):
    """The streaming writer (meta-device structure, HF data streamed in) writes the checkpoint
    Megatron writes from a filled model: same keys, global shapes, dtypes, chunks and bytes."""
    assert read_marker(megatron_models[kind])["writer"] == "stream"
    from_model = convert_hf_to_megatron(hf_models[kind], str(tmp_path / "m"), writer="model",
                                        **quiet)
    streamed, saved = TorchDistCheckpoint(megatron_models[kind]), TorchDistCheckpoint(from_model)
    a, b = streamed.metadata.state_dict_metadata, saved.metadata.state_dict_metadata
    assert set(a) == set(b)
    for key, md in b.items():
        if hasattr(md, "chunks"):
            assert (a[key].size, a[key].properties.dtype) == (md.size, md.properties.dtype), key
            assert sorted((tuple(c.offsets), tuple(c.sizes)) for c in a[key].chunks) == sorted(
                (tuple(c.offsets), tuple(c.sizes)) for c in md.chunks), key
    names = sorted(saved.tensors)
    assert names == sorted(streamed.tensors)
    for name, tensor in saved.read(names).items():
        assert torch.equal(streamed.read([name])[name], tensor), name


def _pytorch_file_writer(path: str):
    from torch.distributed.checkpoint import FileSystemWriter

    return FileSystemWriter(path, single_file_per_rank=True, sync_files=True, thread_count=1,
                            overwrite=True)


@pytest.mark.parametrize("kind,dtype", [("qwen2", None), ("qwen3", None), ("qwen3_moe", None),
                                        ("qwen3_moe", "bfloat16")])
def test_stream_writer_files_equal_pytorch_writer(hf_models, tmp_path, monkeypatch, kind, dtype):
    """Every record of the import's data file is byte for byte the one PyTorch's FileSystemWriter
    (torch.save per chunk) writes from the same planner. With the stored dtype equal to the HF dtype every chunk
    is copied as HF file ranges (nothing passes through memory); a cast reads rows into place."""
    from torch.distributed.checkpoint import FileSystemReader

    from gmpo_megatron.convert import torch_dist_writer

    sources = []

    class RecordingSource(torch_dist_writer.HFChunkSource):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            sources.append(self)

    monkeypatch.setattr(torch_dist_writer, "HFChunkSource", RecordingSource)
    options = dict(quiet, dtype=dtype or "auto")
    ours = convert_hf_to_megatron(hf_models[kind], str(tmp_path / "ours"), **options)
    monkeypatch.setattr(torch_dist_writer, "DirectFileWriter", _pytorch_file_writer)
    theirs = convert_hf_to_megatron(hf_models[kind], str(tmp_path / "theirs"), **options)
    ours_md, theirs_md = (FileSystemReader(d).read_metadata() for d in (ours, theirs))
    assert ours_md.storage_data.keys() == theirs_md.storage_data.keys()
    for index, info in theirs_md.storage_data.items():
        mine = ours_md.storage_data[index]
        with open(os.path.join(ours, mine.relative_path), "rb") as a, \
                open(os.path.join(theirs, info.relative_path), "rb") as b:
            a.seek(mine.offset)
            b.seek(info.offset)
            assert a.read(mine.length) == b.read(info.length), index
    chunk_bytes = sum(math.prod(c.sizes) * md.properties.dtype.itemsize
                      for md in ours_md.state_dict_metadata.values() if hasattr(md, "chunks")
                      for c in md.chunks)
    by_range = sources[0].bytes_by_range
    assert by_range == (chunk_bytes if dtype is None else 0)
