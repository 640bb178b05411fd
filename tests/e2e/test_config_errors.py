"""Bad config keys and values are rejected with the key and the allowed values."""

import pytest

from gmpo_megatron.cli import train_main
from gmpo_megatron.config import ConfigError, load_config

TINY = "examples/moe/tiny_cpu.yaml"


def test_unknown_key_names_close_matches():
    with pytest.raises(ConfigError, match="unknown config key 'train.stpes'.*train.steps"):
        load_config(TINY, ["train.stpes=3"])


def test_bad_literal_lists_allowed_values():
    with pytest.raises(ConfigError, match="algorithm.loss.*'gmpo'.*'grpo'"):
        load_config(TINY, ["algorithm.loss=ppo"])


def test_gmpo_only_option_with_other_loss_is_rejected():
    with pytest.raises(ConfigError, match="clip_level"):
        load_config(TINY, ["algorithm.loss=grpo", "algorithm.clip_level=sequence"])


def test_negative_parallel_size_rejected():
    with pytest.raises(ConfigError, match="parallel.tp"):
        load_config(TINY, ["parallel.tp=0"])


def test_override_without_equals_rejected():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(TINY, ["train.steps"])


def test_cli_exit_code_2_and_message(capsys):
    assert train_main(["--config", TINY, "rollout.nn=3"]) == 2
    assert "unknown config key 'rollout.nn'" in capsys.readouterr().err


def test_overrides_are_typed():
    cfg = load_config(TINY, ["train.lr=1e-4", "parallel.etp=null", "data.train_files=[a.parquet]"])
    assert cfg.train.lr == 1e-4 and cfg.parallel.etp is None and cfg.data.train_files == ["a.parquet"]


def test_token_budget_must_hold_the_longest_sequence():
    with pytest.raises(ConfigError, match="max_tokens_per_microbatch=50.*at least 68"):
        load_config(TINY, ["train.max_tokens_per_microbatch=50"])  # 64 prompt + 4 new tokens


def test_routing_replay_values():
    assert load_config(TINY, ["moe.routing_replay=r2"]).moe.routing_replay == "r2"
    with pytest.raises(ConfigError, match="routing_replay"):
        load_config(TINY, ["moe.routing_replay=r3"])


def test_context_parallel_without_transformer_engine_is_refused():
    import torch

    from gmpo_megatron.megatron.model_builder import BuildOptions, transformer_config
    from gmpo_megatron.models.presets import tiny_qwen3_moe

    if torch.cuda.is_available():
        pytest.skip("the refusal is for machines without Transformer-Engine/CUDA")
    with pytest.raises(ValueError, match="parallel.cp > 1 needs Transformer-Engine"):
        transformer_config(tiny_qwen3_moe(), BuildOptions(cp=2))


def test_trainer_refuses_context_parallel_until_wired():
    from gmpo_megatron.trainer import Trainer

    with pytest.raises(ValueError, match="context parallel training is not wired"):
        Trainer(load_config(TINY, ["parallel.cp=2"]))


def test_fp8_settings_are_validated_and_wired(monkeypatch):
    """FP8 cannot run here (TransformerConfig checks the TE version), so the fields it would get
    are tested directly: refused without TE, refused with fp32 params, wired otherwise."""
    import os

    import torch

    from gmpo_megatron.megatron import model_builder as mb

    bf16 = torch.bfloat16
    monkeypatch.setattr(mb, "te_available", lambda: False)
    with pytest.raises(ValueError, match="install the 'gpu' extra"):
        mb.fp8_settings(mb.BuildOptions(fp8="e4m3", params_dtype=bf16))
    monkeypatch.setattr(mb, "te_available", lambda: True)
    with pytest.raises(ValueError, match="params_dtype=bf16"):
        mb.fp8_settings(mb.BuildOptions(fp8="e4m3"))
    monkeypatch.delenv("NVTE_FP8_BLOCK_SCALING_FP32_SCALES", raising=False)
    assert mb.fp8_settings(mb.BuildOptions(fp8="e4m3", fp8_recipe="blockwise", params_dtype=bf16)) == {
        "fp8": "e4m3", "fp8_recipe": "blockwise"}
    assert os.environ["NVTE_FP8_BLOCK_SCALING_FP32_SCALES"] == "1"
    assert mb.fp8_settings(mb.BuildOptions(fp8="hybrid", fp8_recipe="delayed", params_dtype=bf16)) == {
        "fp8": "hybrid", "fp8_recipe": "delayed"}
    assert mb.fp8_settings(mb.BuildOptions()) == {}


def test_fp8_on_cpu_is_refused_by_the_trainer(tmp_path):
    import torch

    from gmpo_megatron.trainer import Trainer

    if torch.cuda.is_available():
        pytest.skip("CPU refusal")
    with pytest.raises(ValueError, match="precision.fp8='e4m3' needs Transformer-Engine"):
        Trainer(load_config(TINY, ["precision.fp8=e4m3", "precision.params_dtype=bf16", f"output_dir={tmp_path}"]))


def test_options_that_would_do_nothing_are_refused():
    with pytest.raises(ConfigError, match="min_lr=0.0001 has no effect"):
        load_config(TINY, ["train.min_lr=1e-4"])
    assert load_config(TINY, ["train.min_lr=1e-4", "train.lr_schedule=cosine"]).train.min_lr == 1e-4
    with pytest.raises(ConfigError, match="tis_cap is set but algorithm.tis_level is not"):
        load_config(TINY, ["algorithm.tis_cap=3"])
    assert load_config(TINY, ["algorithm.tis_cap=3", "algorithm.tis_level=geometric"]).algorithm.tis_cap == 3
