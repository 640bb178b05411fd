"""The step's data and the bucketed weight gather across 2 gloo ranks (torchrun; see
step_data_worker.py for what each check computes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("step_data") / "report.json"
    worker = os.path.join(os.path.dirname(__file__), "step_data_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             worker, str(path)], capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return json.loads(path.read_text())


@pytest.mark.parametrize("layout", ["data_dp2", "data_tp2"])
def test_each_rank_receives_exactly_its_samples_and_their_old_log_probs_and_routes(report, layout):
    for rank_results in report[layout]:
        for result in rank_results:
            assert result["same"], result
            assert result["old_ok"], result
            assert result["routes_ok"], result
    if layout == "data_dp2":
        # the exchanges moved something: a rank trained on samples the other one scored
        assert any(r["received_others"] for rank_results in report[layout] for r in rank_results)
        # and no rank got the whole batch every time
        assert any(r["held"] < r["n"] for rank_results in report[layout] for r in rank_results)


@pytest.mark.parametrize("layout", ["tp2", "ep2", "pp2", "tp2_ep2_etp1", "dp2"])
def test_bucketed_gather_to_rank0_equals_the_loaded_weights(report, layout):
    for rank, per_bucket in enumerate(report[f"weights_{layout}"]):
        for bucket, result in per_bucket.items():
            assert result["rank0_only"], (rank, bucket)
            assert result["exact"], (rank, bucket)
            assert result["stage_ok"], (rank, bucket)
            if rank == 0:
                assert result["count"] > 0
