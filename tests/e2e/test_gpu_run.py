"""One real GMPO step on a CUDA GPU (skipped without one; see tests/conftest.py)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_cli import run_train  # noqa: E402


@pytest.mark.gpu
def test_one_gmpo_step_on_the_gpu(tmp_path):
    """The tiny run on CUDA (NCCL, Megatron's local spec or TE's when installed; cpu_compat does
    not apply): one full step (rollout, old log-probs, two optimizer steps, weight sync,
    checkpoint) with finite metrics and the engine's log-probs matching Megatron's."""
    from gmpo_megatron.megatron.model_builder import te_available

    out = tmp_path / "run"
    # the TE spec refuses packed micro-batches until its THD path (megatron/packed_seq.py) is verified on a GPU
    packing = "false" if te_available() else "true"
    result = run_train(out, "train.steps=1", f"train.packing={packing}", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(row["reward_mean"]) < float("inf")
    if not row.get("skipped"):  # a step with no informative group makes no update
        assert all(abs(row[key]) < float("inf") for key in ("loss", "grad_norm"))
        assert row["rollout_logp_abs_diff_max"] < 1e-3
    assert (out / "checkpoints" / "step_000001" / "COMPLETE").is_file()
