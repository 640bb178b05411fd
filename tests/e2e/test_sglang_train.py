"""``gmpo-train rollout.engine=sglang`` for real: a real SGLang server generates, the trainer's
weights reach it after every step (version + read-back check), TP2/EP2 layouts, R3, a dense
Qwen3, and a server killed mid-run (recovered, or a clear stop with the checkpoint intact)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_train_cli import QUICK, REPO, TINY, _env, metrics

from gmpo_megatron.rollout.sglang_launch import live_group_members

pytestmark = pytest.mark.sglang

# fp32 on both sides: the engine's log-probs equal the trainer's recomputation up to kernel
# rounding (a 263-step run: mean 2.1e-7, max 8.4e-5 over all its tokens); a wrong or stale
# weight shows as > 1e-2.
MISMATCH_MAX = 1e-3
CHECK = ["rollout.sglang.check_weights=true", "rollout.sglang.check_weights_tol=1e-3"]


def run_sglang(out: Path, *overrides: str, nproc: int = 1, timeout: int = 900, resume: bool = False,
               background: bool = False):
    # SGLang's sampling is not seeded reproducibly, and at step 0 a whole round of the random
    # policy can score alike (then the step is skipped and syncs nothing): dynamic sampling
    # refills until a round has informative groups (P(none in 8 rounds of 4 prompts) ~ 1e-3)
    args = ["--config", TINY, f"output_dir={out}", *QUICK, "algorithm.dynamic_sampling=true",
            "algorithm.dynamic_sampling_max_rounds=8", "train.max_tokens_per_microbatch=64",
            "rollout.engine=sglang", *overrides]
    if resume:
        args.insert(0, "--resume")
    launcher = [sys.executable, "-m", "gmpo_megatron.cli"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "gmpo_megatron.cli"]
    if background:
        return subprocess.Popen(launcher + args, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(launcher + args, cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def assert_synced(rows, steps):
    """Every step ran through the server at the trainer's weight version, and every update's
    old-log-prob pass agrees with the server's log-probs (the weights reached it intact)."""
    assert [r["step"] for r in rows] == list(range(steps))
    trained = [r for r in rows if not r["skipped"]]
    assert trained, "every step was skipped (no informative group): raise rollout.prompts_per_step"
    for row in trained:
        assert row["rollout_logp_abs_diff_max"] < MISMATCH_MAX, row
    for row in rows:
        assert row["sglang_retries"] == 0 and row["sglang_restarts"] == 0
    # a skipped step changes no weight, so it syncs nothing: versions advance per update
    expected, version = [], 1
    for row in rows:
        version += 0 if row["skipped"] else 1
        expected.append(version)
    assert [r["weight_version"] for r in rows] == expected


def test_tiny_run_through_an_attached_server(tmp_path, sglang_server):
    server = sglang_server("moe")
    result = run_sglang(tmp_path / "run", "train.steps=3", f"rollout.sglang.urls=[{server.url}]", *CHECK)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = metrics(tmp_path / "run")
    assert_synced(rows, 3)
    versions = sorted(p.name for p in (tmp_path / "run" / "weight_sync").glob("v*"))
    assert len(versions) == 2 and versions[-1] == f"v{rows[-1]['weight_version']:06d}"  # the newest two


@pytest.mark.slow
@pytest.mark.parametrize("layout,launched", [(["parallel.tp=2"], True), (["parallel.ep=2"], False)],
                         ids=["tp2_launched", "ep2_attached"])
def test_parallel_layouts_sync_the_whole_model_to_the_server(tmp_path, sglang_server, layout, launched):
    """Under torchrun, with the server the trainer launched (it must not inherit torchrun's
    variables) or one it attached to."""
    out = tmp_path / "run"
    server = _launch(out, "rollout.sglang.launch.context_length=256") if launched else [
        f"rollout.sglang.urls=[{sglang_server('moe').url}]"]
    result = run_sglang(out, "train.steps=2", *server, *CHECK, *layout, nproc=2)
    assert result.returncode == 0, result.stderr[-4000:]
    assert_synced(metrics(tmp_path / "run"), 2)


def test_r3_replays_the_servers_routes(tmp_path, sglang_server):
    server = sglang_server("moe")
    result = run_sglang(tmp_path / "run", "train.steps=2", f"rollout.sglang.urls=[{server.url}]",
                        "moe.routing_replay=r3")
    assert result.returncode == 0, result.stderr[-4000:]
    assert_synced(metrics(tmp_path / "run"), 2)


def test_dense_qwen3_weights_reach_the_server(tmp_path, sglang_server):
    server = sglang_server("dense")
    config_dir = tmp_path / "dense_config"
    server.hf_config.save_pretrained(str(config_dir))
    result = run_sglang(tmp_path / "run", "train.steps=2", f"model.hf_config={config_dir}",
                        f"rollout.sglang.urls=[{server.url}]", *CHECK)
    assert result.returncode == 0, result.stderr[-4000:]
    assert_synced(metrics(tmp_path / "run"), 2)


def test_refusals_name_the_fix(tmp_path):
    from sglang_support import tiny_dense_qwen3_config

    tiny_dense_qwen3_config().save_pretrained(str(tmp_path / "dense"))
    r3_dense = run_sglang(tmp_path / "a", f"model.hf_config={tmp_path / 'dense'}", "moe.routing_replay=r3",
                          "rollout.sglang.urls=[http://127.0.0.1:9]")
    assert r3_dense.returncode != 0 and "model has no experts" in r3_dense.stderr
    unreachable = run_sglang(tmp_path / "b", "train.steps=1", "rollout.sglang.urls=[http://127.0.0.1:9]")
    assert unreachable.returncode != 0 and "127.0.0.1:9" in unreachable.stderr
    assert "start the servers" in unreachable.stderr
    both = run_sglang(tmp_path / "c", "rollout.sglang.urls=[http://127.0.0.1:9]",
                      "rollout.sglang.launch.num_servers=1")
    assert both.returncode == 2 and "exactly one of rollout.sglang.urls" in both.stderr
    embedded_r3 = subprocess.run([sys.executable, "-m", "gmpo_megatron.cli", "--config", TINY,
                                  "moe.routing_replay=r3"], cwd=REPO, env=_env(), capture_output=True,
                                 text=True, timeout=120)
    assert embedded_r3.returncode == 2 and "set rollout.engine=sglang" in embedded_r3.stderr


def _launch(out: Path, *overrides: str):
    from sglang_support import SGLANG_PYTHON

    return ["rollout.sglang.launch.dtype=float32", f"rollout.sglang.launch.python={SGLANG_PYTHON}",
            "rollout.sglang.launch.mem_fraction_static=0.3", "rollout.sglang.launch.max_total_tokens=16384",
            *overrides]


def _kill_server_after_step(out: Path, step: int, process: subprocess.Popen) -> threading.Thread:
    """Kill the launched server (its whole process group) once metrics.jsonl has ``step`` rows."""

    def watch():
        path = out / "metrics.jsonl"
        while process.poll() is None:
            if path.exists() and len(path.read_text().splitlines()) >= step:
                pid = int((out / "sglang" / "server_0.pid").read_text())
                os.killpg(pid, signal.SIGKILL)
                return
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_a_killed_launched_server_is_restarted_and_the_run_finishes(tmp_path):
    out = tmp_path / "run"
    process = run_sglang(out, "train.steps=5", *_launch(out), background=True)
    _kill_server_after_step(out, 2, process)
    _, stderr = process.communicate(timeout=1500)
    assert process.returncode == 0, stderr[-4000:]
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(5))
    assert rows[-1]["sglang_restarts"] == 1
    # re-synced to the current weights: every update after the restart agrees with the server
    assert all(r["rollout_logp_abs_diff_max"] < MISMATCH_MAX for r in rows if not r["skipped"])
    log = (out / "sglang" / "server_0.log").read_text()
    assert log.count("=== start") == 2
    # the restarted server went down with the run: no process of its group is left
    pid = int((out / "sglang" / "server_0.pid").read_text())
    assert live_group_members(pid) == []


@pytest.mark.slow
def test_a_server_that_dies_past_the_restart_bound_stops_with_the_checkpoint_intact(tmp_path):
    out = tmp_path / "run"
    process = run_sglang(out, "train.steps=5", "train.save_interval=1",
                         *_launch(out, "rollout.sglang.launch.max_restarts=0"), background=True)
    _kill_server_after_step(out, 2, process)
    _, stderr = process.communicate(timeout=1500)
    assert process.returncode != 0
    assert "restart bound" in stderr and "max_restarts=0" in stderr
    latest = (out / "checkpoints" / "latest").read_text().strip()
    state = json.loads((out / "checkpoints" / latest / "trainer_state.json").read_text())
    assert state["step"] >= 2 and (out / "checkpoints" / latest / "COMPLETE").exists()
