"""A run survives any crash: one run per output_dir, resumable from the last intact checkpoint,
one metrics row per step, no process left behind, and a resume changes only what it may."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_cli import QUICK, REPO, TINY, _env, metrics, run_train  # noqa: E402


def start_train(out: Path, *overrides: str, resume: bool = False) -> subprocess.Popen:
    args = ["--config", TINY, f"output_dir={out}", *QUICK, *overrides]
    if resume:
        args.insert(0, "--resume")
    return subprocess.Popen([sys.executable, "-m", "gmpo_megatron.cli", *args], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before {what}: "
                                 f"{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_a_second_launch_into_a_running_output_dir_fails_fast_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    first = start_train(out, "train.steps=40", "train.save_interval=2")
    try:
        _wait_for(lambda: (out / "checkpoints" / "latest").exists(), 240, "the first checkpoint", first)
        started = time.monotonic()
        second = run_train(out, "train.steps=3", resume=True)
        assert second.returncode != 0
        assert first.poll() is None, "the first run must still be running"
        assert f"pid {first.pid}" in second.stderr and "in use" in second.stderr, second.stderr[-3000:]
        assert time.monotonic() - started < 60
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)
    latest = int((out / "checkpoints" / "latest").read_text().strip().split("_")[1])
    resumed = run_train(out, f"train.steps={latest + 1}", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in metrics(out)] == list(range(latest + 1))


def _children_seen_during_a_save(out: Path, sig: int) -> tuple[subprocess.Popen, dict[int, str]]:
    """Start a run that saves every step; when a checkpoint writer process exists, send ``sig``."""
    proc = start_train(out, "train.steps=200", "train.save_interval=1")
    parent = psutil.Process(proc.pid)
    seen: dict[int, str] = {}

    def writer_running() -> bool:
        for child in parent.children(recursive=True):
            try:
                seen.setdefault(child.pid, " ".join(child.cmdline()))
            except psutil.Error:
                continue
        writing = any((out / "checkpoints").glob("step_*.tmp/*.distcp"))
        forked = [pid for pid, cmd in seen.items() if "gmpo_megatron.cli" in cmd and psutil.pid_exists(pid)]
        return writing and bool(forked)

    _wait_for(writer_running, 300, "a checkpoint writer process", proc)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    return proc, seen


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_no_process_outlives_a_run_killed_during_a_save(tmp_path, sig):
    _, seen = _children_seen_during_a_save(tmp_path / "run", sig)
    deadline = time.monotonic() + 10
    alive = seen
    while alive and time.monotonic() < deadline:
        alive = {pid: cmd for pid, cmd in seen.items()
                 if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE}
        time.sleep(0.2)
    for pid in alive:
        psutil.Process(pid).kill()
    assert not alive, f"left running after the run died: {alive}"


def test_resume_falls_back_from_a_damaged_newest_checkpoint_and_keeps_one_row_per_step(tmp_path):
    out = tmp_path / "run"
    first = run_train(out, "train.steps=3", "train.save_interval=2")
    assert first.returncode == 0, first.stderr[-3000:]
    newest = out / "checkpoints" / "step_000003"
    distcp = sorted(newest.glob("*.distcp"))[0]
    distcp.write_bytes(distcp.read_bytes()[: distcp.stat().st_size // 2])  # a torn write

    resumed = run_train(out, "train.steps=4", "train.save_interval=2", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert str(distcp) in resumed.stderr, resumed.stderr[-3000:]
    assert "step_000002" in resumed.stderr and "resuming from" in resumed.stderr
    assert [r["step"] for r in metrics(out)] == [0, 1, 2, 3]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("reward_mean")] == [0, 1, 2, 3]


def test_every_checkpoint_damaged_is_refused_with_the_fix(tmp_path):
    out = tmp_path / "run"
    assert run_train(out, "train.steps=1").returncode == 0
    state = out / "checkpoints" / "step_000001" / "trainer_state.json"
    state.write_text("{not json")
    resumed = run_train(out, "train.steps=2", resume=True)
    assert resumed.returncode != 0
    assert str(state) in resumed.stderr and "no intact checkpoint" in resumed.stderr, resumed.stderr[-3000:]


def test_a_run_killed_before_its_first_checkpoint_restarts_with_resume(tmp_path):
    out = tmp_path / "run"
    assert run_train(out, "train.steps=2").returncode == 0
    for path in sorted((out / "checkpoints").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    again = run_train(out, "train.steps=2")
    assert again.returncode != 0 and "--resume" in again.stderr, again.stderr[-3000:]
    resumed = run_train(out, "train.steps=2", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "starting again from step 0" in resumed.stderr
    assert [r["step"] for r in metrics(out)] == [0, 1]


REWARD_MODULE = '''
import os
with open(os.path.join(os.path.dirname(__file__), "imports.log"), "a") as log:
    log.write("imported\\n")

def reward(response, ground_truth, extra):
    return float(len(response) % 2)  # varies within a group: every step trains
'''


def test_resume_changes_only_what_it_may_and_records_it(tmp_path):
    out = tmp_path / "run"
    (tmp_path / "my_reward.py").write_text(REWARD_MODULE)
    user_reward = f"reward.fn={tmp_path / 'my_reward.py'}:reward"
    first = run_train(out, "train.steps=2", "train.lr=1e-3", user_reward)
    assert first.returncode == 0, first.stderr[-3000:]
    imports = (tmp_path / "imports.log").read_text().count("imported")

    # the saved config's reward function is never taken from the run dir: it must be given again
    implicit = run_train(out, "train.steps=3", resume=True)
    assert implicit.returncode != 0 and "reward.fn" in implicit.stderr, implicit.stderr[-3000:]
    assert (tmp_path / "imports.log").read_text().count("imported") == imports

    data_stream = run_train(out, "train.steps=3", user_reward, "rollout.n=2", resume=True)
    assert data_stream.returncode != 0
    assert "rollout.n" in data_stream.stderr and "4" in data_stream.stderr, data_stream.stderr[-3000:]

    changed = run_train(out, "train.steps=3", "train.lr=5e-4", user_reward, resume=True)
    assert changed.returncode == 0, changed.stderr[-3000:]
    rows = metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[1]["lr"] == 1e-3 and rows[2]["lr"] == 5e-4
    record = [json.loads(line) for line in (out / "resumes.jsonl").read_text().splitlines()]
    assert record[-1]["changes"]["train.lr"] == [1e-3, 5e-4]
    assert record[-1]["changes"]["train.steps"] == [2, 3]
    assert "lr: 0.0005" in (out / "config.yaml").read_text()


@pytest.mark.slow
def test_resume_at_another_parallel_layout_continues_the_run(tmp_path):
    """2 steps at TP1, then --resume at TP2 (the checkpoint reshards, model and optimizer): the
    steps after it equal a straight TP1 run's within the layout tolerances."""
    lr = "train.lr=2e-4"  # see test_layout_matches_single_process
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_train(straight, "train.steps=5", lr).returncode == 0
    assert run_train(resumed, "train.steps=2", lr).returncode == 0
    second = run_train(resumed, "train.steps=5", lr, "parallel.tp=2", nproc=2, resume=True)
    assert second.returncode == 0, second.stderr[-3000:]
    after = list(zip(metrics(straight), metrics(resumed)))[2:]
    assert [b["step"] for _, b in after] == [2, 3, 4]
    trained = [(a, b) for a, b in after if not a.get("skipped")]
    assert trained, "no step after the resume trained: nothing was compared"
    for a, b in after:
        assert a["reward_mean"] == b["reward_mean"] and a.get("skipped") == b.get("skipped")
    for a, b in trained:
        assert abs(a["loss"] - b["loss"]) <= 1e-6
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * max(1.0, abs(a["grad_norm"]))
    changes = json.loads((resumed / "resumes.jsonl").read_text().splitlines()[-1])["changes"]
    assert changes["parallel.tp"] == [1, 2]
