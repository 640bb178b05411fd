"""Multi-process layouts (2 gloo processes): a checkpoint converted at TP1 loads, gathers and exports
bit-identically through TP2, PP2, EP2 and TP2+EP2 (ETP1), with logits within 1e-4 of
transformers'; conversions run *at* those layouts export bit-identically too."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from convert_helpers import REPO, assert_same_tensors, run_cli

from gmpo_megatron.convert.megatron_to_hf import convert_megatron_to_hf
from gmpo_megatron.convert.staging import read_marker

pytestmark = pytest.mark.slow

TP2 = {"tp": 2}
PP2 = {"pp": 2}
EP2 = {"ep": 2}
TP2_EP2 = {"tp": 2, "ep": 2, "etp": 1}
PAIRS = [("qwen3_moe", TP2), ("qwen3_moe", PP2), ("qwen3_moe", EP2), ("qwen3_moe", TP2_EP2),
         ("qwen3", TP2), ("qwen3", PP2), ("qwen2", TP2), ("qwen2", PP2)]


@pytest.fixture(scope="module")
def layout_report(hf_models, megatron_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    plan = {"hf": hf_models, "megatron": megatron_models, "out": str(root), "pairs": PAIRS}
    plan_path, report_path = root / "plan.json", root / "report.json"
    plan_path.write_text(json.dumps(plan))
    worker = os.path.join(os.path.dirname(__file__), "mp_layouts_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         worker, str(plan_path), str(report_path)],
        capture_output=True, text=True, timeout=420, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return {entry["tag"]: entry for entry in json.loads(report_path.read_text())}


def _entry(report, kind, layout):
    return report[f"{kind}_" + "_".join(f"{k}{v}" for k, v in layout.items())]


@pytest.mark.parametrize("kind, layout", PAIRS)
def test_tp1_checkpoint_gathers_bit_identically_at_layout(layout_report, kind, layout):
    entry = _entry(layout_report, kind, layout)
    assert entry["gathered_mismatches"] == []
    assert entry["gathered_tensors"] == entry["expected_tensors"]


@pytest.mark.parametrize("kind, layout", PAIRS)
def test_logits_match_transformers_at_layout(layout_report, kind, layout):
    logits = _entry(layout_report, kind, layout)["logits"]
    assert logits["max_abs_diff"] <= 1e-4, logits
    assert logits["max_logprob_diff"] <= 1e-4, logits


@pytest.mark.parametrize("kind, layout", PAIRS)
def test_export_through_layout_is_bit_identical(layout_report, hf_models, kind, layout):
    assert_same_tensors(hf_models[kind], _entry(layout_report, kind, layout)["exported"])


@pytest.mark.parametrize("kind, layout", PAIRS)
def test_conversion_at_layout_exports_bit_identically(layout_report, hf_models, tmp_path, kind,
                                                      layout):
    converted = _entry(layout_report, kind, layout)["converted"]
    saved = read_marker(converted)["saved_at_layout"]
    assert {k: saved[k] for k in layout} == layout
    out = convert_megatron_to_hf(converted, str(tmp_path / "hf"), log=lambda message: None)
    assert_same_tensors(hf_models[kind], out)


def test_cli_under_torchrun(hf_models, tmp_path):
    """``torchrun ... tools/convert/convert.py hf-to-megatron --pp 2`` then ``verify`` at TP2+EP2."""
    m = str(tmp_path / "m")
    result = run_cli("hf-to-megatron", "--hf-dir", hf_models["qwen3_moe"], "--out-dir", m,
                     "--pp", "2", nproc=2)
    assert result.returncode == 0, result.stderr[-4000:]
    assert read_marker(m)["saved_at_layout"]["pp"] == 2
    check = run_cli("verify", "--hf-dir", hf_models["qwen3_moe"], "--megatron-dir", m,
                    "--tp", "2", "--ep", "2", "--etp", "1", "--seq-len", "16", nproc=2)
    assert check.returncode == 0 and "PASS logits" in check.stdout, check.stdout + check.stderr[-4000:]
    out = convert_megatron_to_hf(m, str(tmp_path / "hf"), log=lambda message: None)
    assert_same_tensors(hf_models["qwen3_moe"], out)
