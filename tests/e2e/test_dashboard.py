"""What a run leaves for people: dashboard.png and the end-of-run summary of every gmpo-train run,
and gmpo-plot on real runs, on several runs at once and on a run written by an older version."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from test_train_cli import REPO, _env, metrics, run_train

from gmpo_megatron.plot import PANELS, plot_runs

ALL_TITLES = [p.title for p in PANELS.values()]
OLD_VERSION_METRICS = REPO / "tests/e2e/data/metrics_before_percentiles.jsonl"  # the default run of commit 8173531, before the percentiles


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG header; fails if the file is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("dash") / "run"
    result = run_train(out, "train.steps=3")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_every_run_writes_a_dashboard_and_prints_a_summary(run_dir):
    out, result = run_dir
    width, height = png_size(out / "dashboard.png")
    assert width >= 1200 and height >= 900
    assert f"gmpo-train: 3 of 3 steps in {out}" in result.stdout
    assert "reward_mean: first 10% " in result.stdout and "last 10% " in result.stdout
    assert "files: metrics.jsonl, dashboard.png" in result.stdout and "checkpoints/step_000003" in result.stdout


def test_dashboard_of_a_real_run_has_every_panel_with_data(run_dir, tmp_path):
    out, _ = run_dir
    panels = plot_runs([out], tmp_path / "d.png")
    assert list(panels) == ALL_TITLES
    assert all(panels.values()), [t for t, drawn in panels.items() if not drawn]
    png_size(tmp_path / "d.png")


def test_old_version_metrics_leave_their_missing_panels_empty(run_dir, tmp_path):
    """A run from before the percentile metrics: those panels say 'no data'; overlaid with a new
    run, every panel has data (the new run's)."""
    out, _ = run_dir
    old = plot_runs([OLD_VERSION_METRICS], tmp_path / "old.png")
    assert list(old) == ALL_TITLES
    empty = {t for t, drawn in old.items() if not drawn}
    assert empty == {PANELS["seq_log_ratio"].title, PANELS["tails"].title}
    both = plot_runs([out, OLD_VERSION_METRICS], tmp_path / "both.png", labels=["new", "old"], smooth=5)
    assert all(both.values())
    png_size(tmp_path / "both.png")


def test_rows_missing_keys_and_a_torn_last_line_are_not_errors(run_dir, tmp_path):
    out, _ = run_dir
    rows = metrics(out)
    trimmed = tmp_path / "trimmed"
    trimmed.mkdir()
    lines = [json.dumps({k: v for k, v in r.items() if k in ("step", "reward_mean", "kl")}) for r in rows]
    (trimmed / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 3, "rew')  # killed mid-write
    panels = plot_runs([trimmed], tmp_path / "t.png", metrics=["reward", "kl", "grad_norm", "time_step_s"])
    assert panels == {PANELS["reward"].title: True, PANELS["kl"].title: True,
                      PANELS["grad_norm"].title: False, "time_step_s": False}


def _plot_cli(*args: str):
    return subprocess.run([sys.executable, "-m", "gmpo_megatron.plot", *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)


def test_plot_cli_overlays_runs_and_rejects_a_non_run_dir(run_dir, tmp_path):
    out, _ = run_dir
    good = _plot_cli(str(out), str(OLD_VERSION_METRICS), "--out", str(tmp_path / "c.png"), "--labels", "a", "b")
    assert good.returncode == 0, good.stderr
    png_size(tmp_path / "c.png")
    bad = _plot_cli(str(tmp_path), "--out", str(tmp_path / "x.png"))
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "is not a run directory" in bad.stderr
    labels = _plot_cli(str(out), "--labels", "a", "b", "--out", str(tmp_path / "y.png"))
    assert labels.returncode == 2 and "2 labels for 1 runs" in labels.stderr


def test_wandb_logging_works_offline(tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    env_free = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    result = subprocess.run(
        [sys.executable, "-m", "gmpo_megatron.cli", "--config", str(REPO / "examples/moe/tiny_cpu.yaml"),
         f"output_dir={out}", "train.steps=1", "rollout.prompts_per_step=4", "rollout.n=4",
         "train.max_tokens_per_microbatch=40", "data.max_prompt_length=16", "logging.progress_bar=false",
         "logging.wandb=true", "logging.wandb_project=gmpo-test", "logging.dashboard=false"],
        cwd=REPO, env=dict(_env(), **env_free), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), runs
    assert not (out / "dashboard.png").exists()  # logging.dashboard=false
