"""Every refusal triggers on a deliberately broken input, names what is wrong, and leaves no
output directory that looks complete."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from convert_helpers import hf_config
from safetensors.torch import load_file, save_file

from gmpo_megatron.convert import megatron_to_hf as export_module
from gmpo_megatron.convert.cli import main
from gmpo_megatron.convert.errors import ConversionError
from gmpo_megatron.convert.hf_to_megatron import convert_hf_to_megatron
from gmpo_megatron.convert.megatron_to_hf import convert_megatron_to_hf
from gmpo_megatron.convert.staging import MARKER, StagedDir
from gmpo_megatron.convert.validate import (
    check_hf_config,
    check_megatron_config,
    compare_hf_configs,
)

quiet = dict(log=lambda message: None)


def _edit_config(directory, **changes) -> None:
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


def _rewrite_tensors(directory, edit) -> None:
    """Apply ``edit(tensors)`` to every shard and rebuild the index from the shards."""
    weight_map = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            path = os.path.join(directory, name)
            tensors = load_file(path)
            edit(tensors)
            save_file(tensors, path, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, name))
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.fixture
def moe_copy(hf_models, tmp_path):
    return shutil.copytree(hf_models["qwen3_moe"], tmp_path / "hf")


def _refused(argv, capsys, *fragments) -> str:
    assert main(argv) == 2
    message = capsys.readouterr().err
    assert "refused" in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# -- HF side -------------------------------------------------------------------------------------

def test_missing_tensor_is_named(moe_copy, tmp_path, capsys):
    name = "model.layers.1.mlp.experts.6.down_proj.weight"
    _rewrite_tensors(moe_copy, lambda t: t.pop(name, None))
    out = tmp_path / "m"
    _refused(["hf-to-megatron", "--hf-dir", str(moe_copy), "--out-dir", str(out)], capsys,
             "missing tensor", name)
    assert not os.path.exists(out) and not os.listdir(tmp_path).count(".m.gmpo-incomplete")


def test_unexpected_tensor_is_named(moe_copy, tmp_path, capsys):
    def add(tensors):
        if "model.norm.weight" in tensors:
            tensors["model.layers.0.mlp.shared_expert.up_proj.weight"] = torch.zeros(4, 64)
    _rewrite_tensors(moe_copy, add)
    _refused(["hf-to-megatron", "--hf-dir", str(moe_copy), "--out-dir", str(tmp_path / "m")],
             capsys, "unexpected tensor", "shared_expert.up_proj.weight")


def test_wrong_shape_is_named(moe_copy, tmp_path, capsys):
    _edit_config(moe_copy, moe_intermediate_size=32)
    _refused(["hf-to-megatron", "--hf-dir", str(moe_copy), "--out-dir", str(tmp_path / "m")],
             capsys, "model.layers.0.mlp.experts.0.gate_proj.weight", "(48, 64)", "(32, 64)")


def test_untied_lm_head_under_tied_config_is_refused(hf_models, tmp_path, capsys):
    directory = shutil.copytree(hf_models["qwen2"], tmp_path / "hf")

    def add(tensors):
        if "model.embed_tokens.weight" in tensors:
            tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1
    _rewrite_tensors(directory, add)
    _refused(["hf-to-megatron", "--hf-dir", str(directory), "--out-dir", str(tmp_path / "m")],
             capsys, "tie_word_embeddings=true but lm_head.weight differs")


@pytest.mark.parametrize("change, fragment", [
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), "rope type"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(use_sliding_window=True), "use_sliding_window"),
    (dict(attention_bias=True), "attention_bias"),
])
def test_unsupported_config_features_are_refused(change, fragment):
    with pytest.raises(ConversionError, match=fragment):
        check_hf_config(hf_config("qwen3_moe", **change))


# -- config agreement ----------------------------------------------------------------------------

@pytest.mark.parametrize("field, change", [
    ("hidden_size", dict(hidden_size=128)),
    ("num_attention_heads", dict(num_attention_heads=8)),
    ("num_key_value_heads", dict(num_key_value_heads=4)),
    ("head_dim", dict(head_dim=16)),
    ("num_experts", dict(num_experts=16)),
    ("num_experts_per_tok", dict(num_experts_per_tok=4)),
    ("rope_theta", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    ("rms_norm_eps", dict(rms_norm_eps=1e-5)),
    ("tie_word_embeddings", dict(tie_word_embeddings=True)),
    ("vocab_size", dict(vocab_size=128)),
    ("norm_topk_prob", dict(norm_topk_prob=False)),
    ("num_hidden_layers", dict(num_hidden_layers=3)),
])
def test_config_disagreement_names_the_field(field, change):
    with pytest.raises(ConversionError, match=field):
        compare_hf_configs(hf_config("qwen3_moe"), hf_config("qwen3_moe", **change), "a", "b")


def test_qkv_bias_and_qk_norm_disagreement_is_named():
    with pytest.raises(ConversionError) as error:
        compare_hf_configs(hf_config("qwen2"), hf_config("qwen3"), "a", "b")
    for field in ("QKV bias", "QK-norm", "head_dim", "model_type"):
        assert field in str(error.value)


@pytest.mark.parametrize("attribute, value, fragment", [
    ("kv_channels", 16, "kv_channels"),
    ("num_query_groups", 4, "num_query_groups"),
    ("moe_router_topk", 1, "moe_router_topk"),
    ("layernorm_epsilon", 1e-5, "layernorm_epsilon"),
    ("add_qkv_bias", True, "add_qkv_bias"),
    ("qk_layernorm", False, "qk_layernorm"),
    ("moe_router_pre_softmax", True, "moe_router_pre_softmax"),
])
def test_built_megatron_model_is_checked_against_the_hf_config(attribute, value, fragment):
    from gmpo_megatron.convert.hf_to_megatron import _ensure_process_group
    from gmpo_megatron.megatron.model_builder import BuildOptions, build_model
    from gmpo_megatron.megatron.parallel import init_distributed

    _ensure_process_group()
    init_distributed()
    config = hf_config("qwen3_moe")
    model = build_model(config, BuildOptions())
    check_megatron_config(config, model)  # as built: consistent
    original = getattr(model.config, attribute)
    setattr(model.config, attribute, value)
    try:
        with pytest.raises(ConversionError, match=fragment):
            check_megatron_config(config, model)
    finally:
        setattr(model.config, attribute, original)


def test_wrong_rope_base_in_the_built_model_is_caught():
    from gmpo_megatron.convert.hf_to_megatron import _ensure_process_group
    from gmpo_megatron.megatron.model_builder import BuildOptions, build_model
    from gmpo_megatron.megatron.parallel import init_distributed

    _ensure_process_group()
    init_distributed()
    model = build_model(hf_config("qwen3"), BuildOptions())
    other = hf_config("qwen3", rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    with pytest.raises(ConversionError, match="rotary inverse frequencies"):
        check_megatron_config(other, model)


# -- Megatron side -------------------------------------------------------------------------------

def _trainer_style_copy(megatron_dir, target) -> str:
    """The dist checkpoint alone (what the trainer saves): no hf/ and no marker."""
    shutil.copytree(megatron_dir, target, ignore=shutil.ignore_patterns("hf", MARKER))
    return str(target)


def _config_dir(tmp_path, name, **changes) -> str:
    directory = tmp_path / name
    hf_config("qwen3_moe", **changes).save_pretrained(directory)
    return str(directory)


@pytest.mark.parametrize("changes, fragments", [
    (dict(num_hidden_layers=3), ["missing tensor", "decoder.layers.2."]),
    (dict(num_hidden_layers=1, mlp_only_layers=[]), ["unexpected tensor", "decoder.layers.1."]),
    (dict(moe_intermediate_size=32), ["linear_fc1.weight has shape (96, 64)", "(64, 64)"]),
])
def test_megatron_checkpoint_that_does_not_match_the_config(megatron_models, tmp_path, capsys,
                                                            changes, fragments):
    ckpt = _trainer_style_copy(megatron_models["qwen3_moe"], tmp_path / "ckpt")
    config_dir = _config_dir(tmp_path, "cfg", **changes)
    _refused(["megatron-to-hf", "--megatron-dir", ckpt, "--hf-config-dir", config_dir,
              "--out-dir", str(tmp_path / "out")], capsys, *fragments)
    assert not os.path.exists(tmp_path / "out")


def test_trainer_style_checkpoint_needs_and_uses_hf_config_dir(hf_models, megatron_models,
                                                               tmp_path, capsys):
    ckpt = _trainer_style_copy(megatron_models["qwen3_moe"], tmp_path / "ckpt")
    _refused(["megatron-to-hf", "--megatron-dir", ckpt, "--out-dir", str(tmp_path / "o")],
             capsys, "--hf-config-dir")
    out = convert_megatron_to_hf(ckpt, str(tmp_path / "out"),
                                 hf_config_dir=hf_models["qwen3_moe"], **quiet)
    assert os.path.exists(os.path.join(out, "tokenizer_config.json"))


def test_hf_config_dir_disagreeing_with_the_stored_config(megatron_models, tmp_path, capsys):
    config_dir = _config_dir(tmp_path, "cfg", rope_parameters={"rope_type": "default",
                                                               "rope_theta": 1e6})
    _refused(["megatron-to-hf", "--megatron-dir", megatron_models["qwen3_moe"],
              "--hf-config-dir", config_dir, "--out-dir", str(tmp_path / "out")],
             capsys, "rope_theta", "10000.0", "1000000.0")


def test_unfinished_megatron_conversion_is_refused(megatron_models, tmp_path, capsys):
    ckpt = shutil.copytree(megatron_models["qwen3"], tmp_path / "ckpt")
    os.remove(ckpt / MARKER)
    _refused(["megatron-to-hf", "--megatron-dir", str(ckpt), "--out-dir", str(tmp_path / "o")],
             capsys, "unfinished conversion")


def test_not_a_dist_checkpoint_is_refused(hf_models, tmp_path, capsys):
    _refused(["megatron-to-hf", "--megatron-dir", hf_models["qwen3"], "--hf-config-dir",
              hf_models["qwen3"], "--out-dir", str(tmp_path / "o")], capsys,
             "not a dist_checkpointing checkpoint")


# -- output directories --------------------------------------------------------------------------

def test_existing_output_needs_overwrite_and_foreign_dirs_are_never_replaced(
        hf_models, megatron_models, tmp_path, capsys):
    existing = megatron_models["qwen3"]
    _refused(["hf-to-megatron", "--hf-dir", hf_models["qwen3"], "--out-dir", existing], capsys,
             "already exists", "--overwrite")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    _refused(["hf-to-megatron", "--hf-dir", hf_models["qwen3"], "--out-dir", str(foreign),
              "--overwrite"], capsys, "not a gmpo-convert output")
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_overwrite_replaces_a_previous_output(hf_models, tmp_path):
    target = str(tmp_path / "m")
    convert_hf_to_megatron(hf_models["qwen3"], target, **quiet)
    first = os.path.getmtime(os.path.join(target, MARKER))
    convert_hf_to_megatron(hf_models["qwen3"], target, overwrite=True, **quiet)
    assert os.path.getmtime(os.path.join(target, MARKER)) >= first
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_crash_while_writing_leaves_nothing_that_looks_complete(megatron_models, tmp_path,
                                                                monkeypatch):
    calls = {"n": 0}
    real_next = export_module.ShardedSafetensorsWriter._next_spec

    def failing_next(self, name, shape, dtype):  # every written or copied tensor passes here
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError("disk full (simulated)")
        return real_next(self, name, shape, dtype)

    monkeypatch.setattr(export_module.ShardedSafetensorsWriter, "_next_spec", failing_next)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        convert_megatron_to_hf(megatron_models["qwen3_moe"], str(out), max_shard_bytes=20_000,
                               **quiet)
    assert not out.exists()
    assert os.listdir(tmp_path) == []


def test_leftover_staging_dir_from_a_killed_run_is_not_an_output(tmp_path):
    """A kill -9 leaves .<name>.gmpo-incomplete (no marker, hidden name): never the output, and
    the next run clears it."""
    staged = StagedDir(str(tmp_path / "out"))
    staged.prepare()
    (tmp_path / ".out.gmpo-incomplete" / "model-00001-of-00002.safetensors").write_bytes(b"x")
    assert not (tmp_path / "out").exists()
    again = StagedDir(str(tmp_path / "out"))
    assert os.listdir(again.prepare()) == []


def test_stream_writer_is_single_process_tp1(hf_models, tmp_path, capsys):
    _refused(["hf-to-megatron", "--hf-dir", hf_models["qwen3"], "--out-dir", str(tmp_path / "m"),
              "--writer", "stream", "--tp", "2"], capsys, "--writer model")
