"""gmpo-convert verify on a checkpoint written by gmpo-train (no hf/ inside: --hf-config-dir)."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "e2e"))
from test_train_cli import _env, run_train  # noqa: E402


def _convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gmpo_megatron.convert.cli", *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("trainer") / "run"
    result = run_train(run, "train.steps=1")
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def test_verify_accepts_hf_config_dir_for_a_trainer_checkpoint(trainer_run, tmp_path):
    checkpoint = str(trainer_run / "checkpoints" / "step_000001")
    hf = str(trainer_run / "hf")
    export = _convert("megatron-to-hf", "--megatron-dir", checkpoint, "--hf-config-dir", hf,
                      "--out-dir", str(tmp_path / "export"))
    assert export.returncode == 0, export.stderr[-3000:]

    without = _convert("verify", "--hf-dir", str(tmp_path / "export"), "--megatron-dir", checkpoint)
    assert without.returncode == 2 and "pass --hf-config-dir" in without.stderr

    for mode in ("logits", "weights"):
        result = _convert("verify", "--mode", mode, "--hf-dir", str(tmp_path / "export"),
                          "--megatron-dir", checkpoint, "--hf-config-dir", hf)
        assert result.returncode == 0, (mode, result.stdout[-2000:], result.stderr[-3000:])


def test_run_dir_and_export_configs_carry_the_tokenizers_special_token_ids(trainer_run, tmp_path):
    """Without eos_token_id in config.json, generate() on an export never stops at <eos>."""
    import json
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = trainer_run / "hf"
    tokenizer = AutoTokenizer.from_pretrained(str(hf))
    expected = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                "bos_token_id": tokenizer.bos_token_id}
    assert None not in expected.values()
    config = json.loads((hf / "config.json").read_text())
    assert {k: config.get(k) for k in expected} == expected

    # a source config without the ids (e.g. a run dir written before this fix): the export sets them
    old = tmp_path / "old_hf"
    shutil.copytree(hf, old)
    stripped = {k: v for k, v in config.items() if k not in expected}
    (old / "config.json").write_text(json.dumps(stripped))
    checkpoint = str(trainer_run / "checkpoints" / "step_000001")
    export = _convert("megatron-to-hf", "--megatron-dir", checkpoint, "--hf-config-dir", str(old),
                      "--out-dir", str(tmp_path / "export"))
    assert export.returncode == 0, export.stderr[-3000:]
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    assert {k: exported.get(k) for k in expected} == expected
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"))
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
