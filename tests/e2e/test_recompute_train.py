"""``gmpo-train`` with activation recompute: two full GMPO steps (rollout, old log-probs, two
optimizer steps each, weight sync) give the same rewards, loss, grad norm and trained weights as
without recompute, in one process and at TP2 / PP2. The per-setting equality and the check that
recompute really re-runs the chosen modules are in tests/megatron/test_recompute.py."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_cli import (LAYOUT_LR, export_hf, metrics, run_train,  # noqa: E402
                            single_process_run as no_recompute_run, updates)

CASES = {
    # name: (processes, overrides, tolerance on loss and grad norm (relative) / on weights)
    "full_uniform": (1, ["train.recompute=full"], (0.0, 0.0)),
    "full_block": (1, ["train.recompute=full", "train.recompute_method=block", "train.recompute_num_layers=1"],
                   (0.0, 0.0)),
    # layernorm recompute sums the residual gradient's branches in another order (float rounding)
    "selective": (1, ["train.recompute=selective", "train.recompute_modules=[core_attn, layernorm, moe]"],
                  (1e-6, 1e-5)),
    # another layout as well: the tolerances of tests/e2e/test_train_cli.py's layout tests
    "tp2_full": (2, ["parallel.tp=2", "train.recompute=full"], (1e-5, 1e-5)),
    "pp2_selective": (2, ["parallel.pp=2", "train.recompute=selective", "train.recompute_modules=[moe]"],
                      (1e-5, 1e-5)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_recompute_run_matches_no_recompute(tmp_path, name, no_recompute_run):
    nproc, overrides, (tol, weight_tol) = CASES[name]
    base_rows, base_weights = no_recompute_run
    result = run_train(tmp_path / "run", "train.steps=2", *LAYOUT_LR, *overrides, nproc=nproc, timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]
    rows = metrics(tmp_path / "run")
    assert [r["reward_mean"] for r in rows] == [r["reward_mean"] for r in base_rows]
    assert [r["skipped"] for r in rows] == [r["skipped"] for r in base_rows]
    assert updates(base_rows) and base_rows[-1]["grad_norm"] > 0  # a real update is compared
    for ra, rb in zip(updates(base_rows), updates(rows)):
        for key in ("loss", "grad_norm", "kl", "log_ratio_max"):
            assert abs(ra[key] - rb[key]) <= tol * max(1.0, abs(ra[key])), (key, ra[key], rb[key])
    weights = export_hf(tmp_path / "run", tmp_path / "hf")
    assert set(weights) == set(base_weights)
    for key, tensor in base_weights.items():
        assert (weights[key] - tensor).abs().max().item() <= weight_tol, key
