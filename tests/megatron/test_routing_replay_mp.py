"""Routing replay across processes (2 gloo ranks through torchrun; see routing_replay_worker.py):
EP2 replays another data-parallel rank's samples with their recorded global expert ids; TP2 with
sequence parallelism gathers per-sequence routes over the TP group and replays them per shard."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQ, ROWS, TOP_K = 16, 3, 2


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    report_path = tmp_path_factory.mktemp("routing_replay") / "report.json"
    worker = os.path.join(os.path.dirname(__file__), "routing_replay_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         worker, str(report_path)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return json.loads(report_path.read_text())


def test_ep2_replays_the_other_ranks_samples_with_their_recorded_global_experts(reports):
    for ep2 in (r["ep2"] for r in reports):
        assert ep2["fresh_differs"], "the router move must change fresh routing"
        assert ep2["replayed_equal"]
        assert ep2["remote_experts_replayed"]  # ids of experts living on the other EP rank
        assert ep2["router_grads"]
        assert ep2["samples_exchanged"] == list(range(2 * ROWS))


def test_ep2_expert_load_is_reduced_over_both_ranks(reports):
    for ep2 in (r["ep2"] for r in reports):
        assert set(ep2["local_load"].values()) == {SEQ * ROWS * TOP_K}
        assert set(ep2["reduced_load"].values()) == {2 * SEQ * ROWS * TOP_K}
        assert ep2["imbalance"] >= 1.0


def test_tp2_sequence_parallel_routes_gather_and_replay_per_shard(reports):
    for tp2 in (r["tp2_sp"] for r in reports):
        assert set(tp2["shard_rows"].values()) == {SEQ // 2 * ROWS}
        assert tp2["same_on_tp_ranks"]
        assert tp2["replayed_equal"]
