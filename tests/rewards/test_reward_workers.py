"""Rewards scored in worker processes: in parallel, with a per-call time limit, never outliving the run."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from gmpo_megatron.rewards import RewardError, RewardWorkers, score_batch

SLOW_MODULE = '''
import os, time

def slow_exact(response, ground_truth, extra):
    time.sleep(float(extra.get("sleep", 0.0)))
    return float(response == ground_truth)

def hang_on_x(response, ground_truth, extra):
    if response == "x":
        while True:
            time.sleep(1)
    return 1.0

def pid(response, ground_truth, extra):
    return float(os.getpid())

def raise_on_bad(response, ground_truth, extra):
    if response == "bad":
        raise RuntimeError("no verdict")
    return 0.5
'''


@pytest.fixture
def slow_rewards(tmp_path, monkeypatch):
    (tmp_path / "slow_rewards.py").write_text(SLOW_MODULE)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "slow_rewards"
    sys.modules.pop("slow_rewards", None)


def test_workers_score_in_parallel_in_order(slow_rewards):
    """8 calls of 0.5 s on 4 workers take ~1 s, not 4 s; the rewards keep the responses' order."""
    responses = ["a", "b"] * 4
    with RewardWorkers(f"{slow_rewards}:slow_exact", 4, timeout_s=30, timeout_score=0.0) as workers:
        score_batch(workers, ["warm"], ["up"])  # start-up (spawn + import) is not what is timed
        start = time.perf_counter()
        scores = score_batch(workers, responses, ["a"] * 8, [{"sleep": 0.5}] * 8)
        elapsed = time.perf_counter() - start
    assert scores.rewards == [1.0, 0.0] * 4 and scores.timeouts == 0
    assert elapsed < 3.0, elapsed


def test_a_call_past_the_timeout_scores_timeout_score_and_is_counted(slow_rewards):
    with RewardWorkers(f"{slow_rewards}:hang_on_x", 2, timeout_s=1.0, timeout_score=-0.5) as workers:
        scores = score_batch(workers, ["a", "x", "b", "c", "x", "d"], ["0"] * 6)
        assert scores.rewards == [1.0, -0.5, 1.0, 1.0, -0.5, 1.0] and scores.timeouts == 2
        # the hung workers were replaced: the pool still scores
        assert score_batch(workers, ["a"], ["0"]).rewards == [1.0]


def test_a_file_path_reward_loads_in_the_workers(tmp_path):
    (tmp_path / "file_reward.py").write_text(SLOW_MODULE)
    with RewardWorkers(f"{tmp_path / 'file_reward.py'}:pid", 2, timeout_s=30, timeout_score=0.0) as workers:
        pids = score_batch(workers, ["a"] * 16, ["a"] * 16).rewards
    assert os.getpid() not in pids and len(set(pids)) >= 1


def test_an_exception_in_a_worker_names_the_sample(slow_rewards):
    with RewardWorkers(f"{slow_rewards}:raise_on_bad", 2, timeout_s=30, timeout_score=0.0) as workers:
        with pytest.raises(RewardError, match=r"raised on sample 2 \(ground truth 'g2'.*RuntimeError: no verdict"):
            score_batch(workers, ["ok", "ok", "bad", "ok"], ["g0", "g1", "g2", "g3"])


def test_a_reward_only_registered_in_this_process_is_refused_clearly():
    from gmpo_megatron.rewards import register_reward_fn

    register_reward_fn("only_here", lambda r, g, e: 1.0, overwrite=True)
    with RewardWorkers("only_here", 1, timeout_s=30, timeout_score=0.0) as workers:
        with pytest.raises(RewardError, match="could not load reward.fn='only_here'.*reward.num_workers=0"):
            score_batch(workers, ["a"], ["a"])


def test_workers_stop_on_close_and_die_with_a_killed_parent(slow_rewards, tmp_path):
    workers = RewardWorkers(f"{slow_rewards}:pid", 2, timeout_s=30, timeout_score=0.0)
    pids = {int(p) for p in score_batch(workers, ["a"] * 8, ["a"] * 8).rewards}
    workers.close()
    assert not any(_alive(p) for p in pids)

    # a parent killed with SIGKILL runs no exit hook: the workers must still go
    script = textwrap.dedent(f"""
        import sys, time
        from gmpo_megatron.rewards import RewardWorkers, score_batch
        workers = RewardWorkers("{slow_rewards}:pid", 2, timeout_s=30, timeout_score=0.0)
        print(sorted({{int(p) for p in score_batch(workers, ["a"] * 8, ["a"] * 8).rewards}}), flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ))
    child_pids = eval(parent.stdout.readline())
    assert child_pids and all(_alive(p) for p in child_pids)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in child_pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in child_pids)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False
