"""DAPO dynamic sampling through gmpo-train: refill rounds when most groups are uninformative, the
data stream advancing by what was consumed (resume stays bit-identical), and a 50-step DAPO run
that learns."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_train_cli import REPO, _env, metrics, run_train, updates

DYNAMIC = ["algorithm.dynamic_sampling=true"]


def _data_position(out) -> int:
    latest = (out / "checkpoints" / "latest").read_text().strip()
    return json.loads((out / "checkpoints" / latest / "trainer_state.json").read_text())["data_position"]


def test_uninformative_groups_are_refilled_from_more_prompts(tmp_path):
    """4 prompts x 4 samples of a random policy: most groups get all-0 rewards, so a step needs
    more than one round of 4 prompts to find 4 informative groups."""
    out = tmp_path / "run"
    result = run_train(out, "train.steps=2", *DYNAMIC)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics(out)
    rounds = [int(r["dynamic_sampling_rounds"]) for r in rows]
    assert max(rounds) > 1, rounds
    assert all(1 <= n <= 4 for n in rounds)  # algorithm.dynamic_sampling_max_rounds default 4
    for r in rows:
        assert r["num_groups"] == 4 * r["dynamic_sampling_rounds"]  # every round's groups are counted
        assert r["kept_groups"] == r["informative_groups"] <= 4  # only informative groups train
    for r in updates(rows):
        assert r["num_samples"] == 4 * r["kept_groups"]
    assert _data_position(out) == 4 * sum(rounds)  # the stream advanced by every prompt drawn


def test_a_step_without_informative_groups_after_max_rounds_is_skipped(tmp_path):
    out = tmp_path / "run"
    result = run_train(out, "train.steps=1", *DYNAMIC, "algorithm.dynamic_sampling_max_rounds=1")
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = metrics(out)
    assert row["skipped"] == 1 and row["kept_groups"] == 0 and row["dynamic_sampling_rounds"] == 1
    assert "raise algorithm.dynamic_sampling_max_rounds (now 1)" in result.stderr


@pytest.mark.slow
def test_resume_with_dynamic_sampling_is_bit_identical(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_train(straight, "train.steps=4", *DYNAMIC).returncode == 0
    assert run_train(resumed, "train.steps=2", *DYNAMIC).returncode == 0
    second = run_train(resumed, "train.steps=4", *DYNAMIC, resume=True)
    assert second.returncode == 0, second.stderr[-3000:]
    a, b = metrics(straight), metrics(resumed)
    assert [r["step"] for r in b] == [0, 1, 2, 3]
    for ra, rb in zip(a, b):
        for key in ("reward_mean", "dynamic_sampling_rounds", "kept_groups", "loss", "grad_norm", "log_ratio_p99"):
            assert ra.get(key) == rb.get(key), (ra["step"], key)
    assert _data_position(straight) == _data_position(resumed)


@pytest.mark.slow
def test_dapo_with_dynamic_sampling_learns_in_50_steps(tmp_path):
    """The demo config (32 prompts x 8 samples) with the DAPO loss and dynamic sampling: the reward
    of the last 10% of steps is at least twice that of the first 10%, and 0.1 higher."""
    out = tmp_path / "dapo"
    cmd = [sys.executable, "-m", "gmpo_megatron.cli", "--config", str(REPO / "examples/moe/tiny_cpu.yaml"),
           f"output_dir={out}", "train.steps=50", "algorithm.loss=dapo", "algorithm.clip_eps_low=null",
           "algorithm.clip_eps_high=null", *DYNAMIC, "logging.progress_bar=false"]
    result = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics(out)
    first = sum(r["reward_mean"] for r in rows[:5]) / 5
    last = sum(r["reward_mean"] for r in rows[-5:]) / 5
    rounds = [r["dynamic_sampling_rounds"] for r in rows]
    print(f"DAPO+DS 50 steps: reward first 10% {first:.3f}, last 10% {last:.3f}; rounds/step "
          f"mean {sum(rounds) / len(rounds):.2f} max {max(rounds):.0f}; skipped {sum(r['skipped'] for r in rows)}; "
          f"step time {sum(r['time_step_s'] for r in rows):.1f} s")
    assert last >= 2 * first and last - first >= 0.1, (first, last)
