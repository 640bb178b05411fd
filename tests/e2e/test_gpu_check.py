"""benchmarks/gpu_check.py: its CPU smoke run (the same code as on a GPU, tiny model, fp32 and a
BF16 variant) passes and appends a well-formed section; its FLOP and parameter arithmetic is
checked against Megatron's model and the formula; the real GPU run is marked ``gpu``."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _module():
    if "gpu_check" not in sys.modules:  # registered first: its dataclasses look their module up
        spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
        sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["gpu_check"])
    return sys.modules["gpu_check"]


def _run(*args: str, timeout: int = 900):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    env.pop("RANK", None)
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


EXISTING = "# GPU results\n\nEarlier entries stay.\n\n## 2026-11-21: no GPU lent\n\nDevice: none.\n"


def test_cpu_smoke_run_passes_and_appends_a_section(tmp_path):
    results, raw = tmp_path / "gpu-results.md", tmp_path / "raw.json"
    results.write_text(EXISTING)
    run = _run("--cpu-smoke", "--results", str(results), "--json", str(raw))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    text = results.read_text()
    assert text.startswith(EXISTING.rstrip("\n"))  # appended, nothing replaced
    section = text[len(EXISTING.rstrip("\n")):]
    assert re.search(r"^## \d{4}-\d\d-\d\d \d\d:\d\d UTC: CPU smoke run of the GPU check \(not a GPU result\) "
                     r"on CPU", section, re.M)
    assert "Command: `python benchmarks/gpu_check.py --cpu-smoke --results " in section
    assert re.search(r"^Device: CPU .*megatron-core 0\.16\.1; .*commit ", section, re.M)
    assert "| variant | baseline | old log-prob max / mean |" in section
    assert "| variant | train step s | train tokens/s | TFLOP/s | MFU |" in section
    rows = {line.split(" | ")[0].strip("| "): line for line in section.splitlines() if line.startswith("| local_")}
    assert set(rows) == {"local_fp32_packed", "local_fp32_leaky (control)", "local_bf16_padded",
                         "local_bf16_packed", "local_fp32"}
    assert rows["local_fp32_leaky (control)"].endswith("| PASS (control: difference detected) |")
    assert all(rows[k].endswith("| PASS |") for k in ("local_fp32_packed", "local_bf16_padded", "local_bf16_packed"))
    assert section.rstrip().endswith("Verdict: PASS")

    report = json.loads(raw.read_text())
    by_variant = {c["variant"]: c for c in report["agreement"]["comparisons"]}
    assert by_variant["local_fp32_packed"]["values"]["logp_old_max"] <= 1e-5  # fp32 layouts agree
    assert by_variant["local_fp32_leaky"]["values"]["logp_old_mean"] > 0.05  # the control really leaks
    tp = report["throughput"]
    row = tp["variants"]["local_fp32"]
    assert row["tokens_per_s"] > 0 and row["mfu"] is None  # no peak on CPU: no MFU
    assert tp["tokens_per_step"] == 4 * 32 and row["tokens"] == 4 * 32
    # the reported TFLOP/s is the formula's FLOPs over the measured time
    assert abs(row["tflops"] - tp["train_flops_per_step"] / row["step_s"] / 1e12) <= 1e-9 * max(1.0, row["tflops"])


def test_param_counts_equal_megatrons_model(megatron_single_process):
    """The ~1B throughput model and the agreement model: the arithmetic's total equals the
    parameters of Megatron's GPTModel (meta device), and the throughput model is ~1B."""
    import torch

    from gmpo_megatron.megatron.model_builder import BuildOptions, build_model

    gpu_check = _module()
    for hf in (gpu_check.throughput_config(False), gpu_check.agreement_config(False)):
        model = build_model(hf, BuildOptions(params_dtype=torch.bfloat16, meta_device=True))
        assert sum(p.numel() for p in model.parameters()) == gpu_check.param_counts(hf)["total"]
    counts = gpu_check.param_counts(gpu_check.throughput_config(False))
    assert 0.9e9 <= counts["total"] <= 1.2e9, counts
    assert counts["active"] < counts["total"] / 2


def test_model_flops_formula():
    """Against the formula written out in float64 for fresh odd lengths: 6 N S + 6 L (h_q d) S^2
    per sequence, N = active parameters minus the input embedding (untied)."""
    import random

    gpu_check = _module()
    hf = gpu_check.throughput_config(False)
    rng = random.Random(3)
    lengths = [rng.randint(1, 5000) for _ in range(7)]
    h, layers, heads, d = hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.head_dim
    attention = h * heads * d * 2 + 2 * h * hf.num_key_value_heads * d + 2 * d + 2 * h
    per_layer = attention + hf.num_experts * h + hf.num_experts_per_tok * 3 * h * hf.moe_intermediate_size
    n = layers * per_layer + hf.vocab_size * h + h  # lm_head + final norm; the input embedding is a lookup
    expected = sum(6.0 * n * s + 6.0 * layers * heads * d * s * s for s in lengths)
    assert gpu_check.model_flops(hf, lengths, training=True) == pytest.approx(expected, rel=1e-12)
    assert gpu_check.model_flops(hf, lengths, training=False) == pytest.approx(expected / 3, rel=1e-12)


def test_peak_is_read_from_the_device_name():
    gpu_check = _module()
    assert gpu_check.peak_bf16_tflops("NVIDIA H100 80GB HBM3", None) == 989.0
    assert gpu_check.peak_bf16_tflops("NVIDIA H200", None) == 989.0
    assert gpu_check.peak_bf16_tflops("NVIDIA H100 PCIe", None) == 756.0
    assert gpu_check.peak_bf16_tflops("Some Future GPU", None) is None
    assert gpu_check.peak_bf16_tflops("NVIDIA H200", 900.0) == 900.0


def test_wheels_install_offline_from_the_folder(tmp_path):
    gpu_check = _module()
    with pytest.raises(SystemExit, match="no .whl files"):
        gpu_check.wheel_install_command(tmp_path)
    (tmp_path / "megatron_core-0.16.1-py3-none-any.whl").write_bytes(b"")
    command = gpu_check.wheel_install_command(tmp_path)
    assert command[1:4] == ["-m", "pip", "install"] and "--no-index" in command
    assert command[command.index("--find-links") + 1] == str(tmp_path)
    requirements = Path(command[command.index("-r") + 1]).read_text()
    assert "megatron-core==0.16.1" in requirements and "\ntorch" not in requirements
    carried = (REPO / "benchmarks" / "gpu_check_wheels.txt").read_text()
    assert "megatron-core==0.16.1" in carried and not re.search(r"^torch\b", carried, re.M)


@pytest.mark.gpu
def test_the_gpu_check_passes_on_the_gpu(tmp_path):
    results = tmp_path / "gpu-results.md"
    run = _run("--results", str(results), "--json", str(tmp_path / "raw.json"), timeout=660)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-3000:]
    assert results.read_text().rstrip().endswith("Verdict: PASS")
