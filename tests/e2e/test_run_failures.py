"""Runs that would fail late, or confusingly, fail at the cause with one line naming it."""

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_cli import QUICK, REPO, TINY, _env, run_train  # noqa: E402

HUGE_REWARD = '''
def huge(response, ground_truth, extra):
    return 1e308
'''


def test_a_huge_reward_is_named_not_reported_as_a_nan_loss(tmp_path):
    (tmp_path / "huge_reward.py").write_text(HUGE_REWARD)
    result = run_train(tmp_path / "run", "train.steps=1", f"reward.fn={tmp_path / 'huge_reward.py'}:huge")
    assert result.returncode != 0
    assert "returned 1e+308 for sample 0" in result.stderr, result.stderr[-3000:]
    assert "Lower train.lr" not in result.stderr


HANGING_REWARD = '''
import time

def hang(response, ground_truth, extra):
    time.sleep(3600)
'''


def test_a_hanging_reward_times_out_scores_timeout_score_and_is_logged(tmp_path):
    import json

    (tmp_path / "hanging_reward.py").write_text(HANGING_REWARD)
    out = tmp_path / "run"
    result = run_train(out, "train.steps=1", "rollout.prompts_per_step=1", "rollout.n=2",
                       f"reward.fn={tmp_path / 'hanging_reward.py'}:hang", "reward.num_workers=2",
                       "reward.timeout_s=0.5", "reward.timeout_score=0.25")
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["reward_timeouts"] == 2 and row["reward_mean"] == 0.25


def test_a_ground_truth_the_reward_cannot_parse_is_refused_before_any_step(tmp_path):
    import json

    data = tmp_path / "sums.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "ground_truth": "2"}) + "\n"
                    + json.dumps({"prompt": "2+2=", "ground_truth": "four"}) + "\n")
    out = tmp_path / "run"
    result = run_train(out, "train.steps=1", f"data.train_files=[{data}]", "data.task=null")
    assert result.returncode != 0
    assert "sums.jsonl: row 1, column 'ground_truth'" in result.stderr and "'four'" in result.stderr
    assert not (out / "metrics.jsonl").exists()


def _our_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("gmpo-train:")]


def test_a_start_up_error_is_one_line_with_the_traceback_in_error_log(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the FP8 refusal is for machines without Transformer-Engine")
    out = tmp_path / "run"
    result = run_train(out, "train.steps=1", "precision.fp8=e4m3", "precision.params_dtype=bf16")
    assert result.returncode == 1
    lines = _our_lines(result.stderr)
    assert len(lines) == 1 and "precision.fp8='e4m3' needs Transformer-Engine" in lines[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "Traceback" in (out / "error.log").read_text()
    debug = subprocess.run([sys.executable, "-m", "gmpo_megatron.cli", "--debug", "--config", TINY,
                            f"output_dir={tmp_path / 'debug'}", *QUICK, "precision.fp8=e4m3",
                            "precision.params_dtype=bf16"], cwd=REPO, env=_env(), capture_output=True,
                           text=True, timeout=300)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_under_torchrun_a_start_up_error_is_printed_once_and_every_rank_exits(tmp_path):
    """World size 2 with tp=4: each rank refuses; the cause is printed once (rank 0), none hangs."""
    result = run_train(tmp_path / "run", "train.steps=1", "parallel.tp=4", nproc=2, timeout=240)
    assert result.returncode != 0
    lines = _our_lines(result.stderr)
    assert len(lines) == 1 and "world size 2 is not divisible by tp*pp*cp" in lines[0], result.stderr[-3000:]
    assert "gmpo_megatron/" not in result.stderr  # no traceback of ours (torchrun prints its own summary)


def test_a_config_error_under_torchrun_is_printed_once(tmp_path):
    result = run_train(tmp_path / "run", "train.stpes=1", nproc=2, timeout=240)
    assert result.returncode != 0  # torchrun exits 1 whatever its ranks' codes (2 here)
    assert len([line for line in _our_lines(result.stderr) if "train.stpes" in line]) == 1, result.stderr[-3000:]


def test_switching_the_tiny_config_to_countdown_trains(tmp_path):
    out = tmp_path / "run"
    result = run_train(out, "train.steps=1", "data.task=countdown", "reward.fn=countdown",
                       "rollout.max_new_tokens=8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((out / "data").glob("countdown_seed1_*.parquet"))) == 1
