"""examples/moe/stability_study.py: its summary arithmetic and collapse rule on scripted metrics,
and the whole driver on a smoke setting (2 steps, 1 seed, every variant)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
from test_dashboard import png_size
from test_train_cli import QUICK, REPO

spec = importlib.util.spec_from_file_location("stability_study", REPO / "examples/moe/stability_study.py")
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)


def _rows(rewards, **extra):
    return [dict(step=i, reward_mean=r, **{k: v[i] for k, v in extra.items()}) for i, r in enumerate(rewards)]


def test_run_summary_final_reward_extremes_and_grad_norm():
    rows = _rows([0.1] * 10 + [0.5] * 10, **{"log_ratio_p0.1": [-0.1] * 19 + [-2.0],
                                              "log_ratio_p99.9": [0.3] * 20,
                                              "log_ratio_abs_gt_0.4": [0.0] * 10 + [0.1] * 10,
                                              "grad_norm_max": [1.0] * 19 + [7.5]})
    rows[3] = {"step": 3, "reward_mean": 0.1, "skipped": 1}  # a skipped step has no train metrics
    s = study.run_summary(rows, 0)
    assert s["final_reward"] == pytest.approx(0.5) and s["best_reward_10"] == pytest.approx(0.5)
    assert s["log_ratio_p0.1_min"] == -2.0 and s["log_ratio_p99.9_max"] == 0.3
    assert s["frac_abs_log_ratio_gt_0.4"] == pytest.approx(1.0 / 19)
    assert s["grad_norm_max"] == 7.5 and s["skipped_steps"] == 1 and not s["collapsed"]


def test_collapse_rule():
    learned_then_lost = _rows([0.1] * 10 + [0.6] * 10 + [0.1] * 5)  # best 10-step mean 0.6, final 0.1
    assert study.run_summary(learned_then_lost, 0)["collapsed"]
    never_learned = _rows([0.1] * 20)  # best < 0.2: poor, not collapsed
    assert not study.run_summary(never_learned, 0)["collapsed"]
    assert study.run_summary(_rows([0.5] * 20), 1)["collapsed"]  # stopped with an error


def test_variant_summary_and_table():
    runs = [study.run_summary(_rows([r] * 10, grad_norm_max=[g] * 10), 0) for r, g in ((0.2, 1.0), (0.4, 3.0))]
    v = study.variant_summary(runs)
    assert v["final_reward_mean"] == pytest.approx(0.3) and v["final_reward_sd"] == pytest.approx(math.sqrt(0.02))
    assert v["grad_norm_max"] == 3.0 and v["collapsed"] == 0 and math.isnan(v["log_ratio_p0.1_min"])
    table = study.summary_table({"gmpo_clip0.2": v})
    assert "| gmpo_clip0.2 | 2 | 0.300 ± 0.141 | - | - | - | 3.00 | 0/2 |" in table


@pytest.mark.slow
def test_smoke_study_writes_every_run_summary_and_dashboards(tmp_path):
    """--steps 2 --seeds 1: six gmpo-train runs (~25 s each on 2 cores), then the summary."""
    out = tmp_path / "study"
    fast = [o for o in QUICK if not o.startswith(("train.mini_batches", "logging.", "reward."))]
    assert study.main(["--steps", "2", "--seeds", "1", "--out", str(out), "--set", *fast]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["variants"]) == set(study.VARIANTS)
    for name in study.VARIANTS:
        run = summary["runs"][f"{name}/seed1"]
        assert run["returncode"] == 0 and run["steps"] == 2, (name, run)
        assert (out / name / "seed1" / "metrics.jsonl").is_file() and (out / name / "seed1.log").is_file()
        png_size(out / "dashboards" / f"{name}.png")
    png_size(out / "dashboards" / "all_variants_seed1.png")
    text = (out / "summary.md").read_text()
    assert "| gmpo_noclip | 1 |" in text and "Collapse rule:" in text and "Wall time:" in text
    # a second call reuses the finished runs instead of training again
    assert study.main(["--steps", "2", "--seeds", "1", "--out", str(out), "--variants", "gmpo_clip0.1"]) == 0
    assert json.loads((out / "summary.json").read_text())["runs"]["gmpo_clip0.1/seed1"]["reused"]
