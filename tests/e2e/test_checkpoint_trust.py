"""A checkpoint is data, never code: a crafted pickle inside one is refused by every reader, by name.

The poisoned ``.metadata`` below would create a marker file through ``os.system`` if anything
unpickled it with plain ``pickle.load``. Each command must fail, name the file and the refused
class, and leave no marker.
"""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_cli import REPO, _env, run_train  # noqa: E402


class _RunsCode:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def poison_metadata(checkpoint: Path, marker: Path) -> Path:
    """Replace ``.metadata`` with a pickle that runs code; keep MANIFEST.json consistent with it (an
    attacker who can write the file can rewrite the manifest too)."""
    target = checkpoint / ".metadata"
    target.write_bytes(pickle.dumps(_RunsCode(marker)))
    manifest = checkpoint / "MANIFEST.json"
    if manifest.exists():
        from gmpo_megatron.megatron.checkpoint_manifest import file_digest

        entries = json.loads(manifest.read_text())
        entries["files"][".metadata"] = file_digest(target)
        manifest.write_text(json.dumps(entries, indent=1, sort_keys=True))
    return target


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    result = run_train(root / "run", "train.steps=1")
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run"


@pytest.fixture()
def poisoned_run(tmp_path, trained_run):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    marker = tmp_path / "code_ran"
    target = poison_metadata(run / "checkpoints" / "step_000001", marker)
    return run, target, marker


def _convert(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "gmpo_megatron.convert.cli", *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)


def _assert_refused(result, target: Path, marker: Path) -> None:
    assert result.returncode != 0, result.stdout[-2000:]
    assert not marker.exists(), "the checkpoint's pickle ran code"
    assert str(target) in result.stderr, result.stderr[-3000:]
    assert "posix.system" in result.stderr, result.stderr[-3000:]


def test_resume_refuses_a_metadata_pickle_that_runs_code(poisoned_run):
    run, target, marker = poisoned_run
    _assert_refused(run_train(run, "train.steps=2", resume=True), target, marker)


@pytest.mark.parametrize("reader", ["stream", "model"])
def test_megatron_to_hf_refuses_a_metadata_pickle_that_runs_code(tmp_path, poisoned_run, reader):
    run, target, marker = poisoned_run
    result = _convert("megatron-to-hf", "--megatron-dir", str(target.parent), "--hf-config-dir",
                      str(run / "hf"), "--out-dir", str(tmp_path / "hf_out"), "--reader", reader)
    _assert_refused(result, target, marker)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, trained_run):
    """The trained run exported to HF, and that HF imported back: a gmpo-convert Megatron output."""
    root = tmp_path_factory.mktemp("converted")
    clean = trained_run / "checkpoints" / "step_000001"
    result = _convert("megatron-to-hf", "--megatron-dir", str(clean), "--hf-config-dir",
                      str(trained_run / "hf"), "--out-dir", str(root / "hf"))
    assert result.returncode == 0, result.stderr[-3000:]
    result = _convert("hf-to-megatron", "--hf-dir", str(root / "hf"), "--out-dir", str(root / "mcore"))
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "hf", root / "mcore"


@pytest.mark.parametrize("mode", ["weights", "logits"])
def test_verify_refuses_a_metadata_pickle_that_runs_code(tmp_path, converted, mode):
    hf, mcore = converted
    poisoned = tmp_path / "mcore"
    shutil.copytree(mcore, poisoned)
    marker = tmp_path / "code_ran"
    target = poison_metadata(poisoned, marker)
    result = _convert("verify", "--mode", mode, "--hf-dir", str(hf), "--megatron-dir", str(poisoned))
    _assert_refused(result, target, marker)

