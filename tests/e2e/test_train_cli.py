"""``gmpo-train`` for real: outputs, resume, bad data, and parallel layouts equal to one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "examples/moe/tiny_cpu.yaml")
# Small and quick: 2 mini-batches so that the second one trains on a moved policy (non-zero KL).
QUICK = ["rollout.prompts_per_step=4", "rollout.n=4", "train.mini_batches=2", "train.max_tokens_per_microbatch=40",
         "data.max_prompt_length=16",
         "logging.progress_bar=false", "reward.fn=arithmetic_first_integer"]
REQUIRED_KEYS = {"step", "reward_mean", "response_len_mean", "loss", "grad_norm", "entropy", "kl",
                 "log_ratio_min", "log_ratio_max", "clipfrac", "time_step_s"}


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    return env


def run_train(out: Path, *overrides: str, nproc: int = 1, resume: bool = False, timeout: int = 300):
    args = ["--config", TINY, f"output_dir={out}", *QUICK, *overrides]
    if resume:
        args.insert(0, "--resume")
    if nproc == 1:
        cmd = [sys.executable, "-m", "gmpo_megatron.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "gmpo_megatron.cli", *args]
    result = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    return result


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def updates(rows: list[dict]) -> list[dict]:
    """The rows of steps that updated the policy (a step with no informative group is skipped:
    it has no loss, grad norm or log-ratio metrics)."""
    return [r for r in rows if not r["skipped"]]


def test_short_run_writes_everything(tmp_path):
    out = tmp_path / "run"
    result = run_train(out, "train.steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics(out)
    assert [r["step"] for r in rows] == [0, 1]
    # Step 0's rewards are all 0 here (4 groups of a random policy): no informative group, so it
    # is skipped (no update) and logged as such; step 1 trains.
    assert [r["skipped"] for r in rows] == [1, 0]
    assert rows[0]["informative_groups"] == 0 and "loss" not in rows[0]
    assert "step 0 skipped (no informative group" in result.stderr
    assert REQUIRED_KEYS <= set(rows[1]), REQUIRED_KEYS - set(rows[1])
    assert (out / "config.yaml").is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000002"
    assert (out / "checkpoints" / "step_000002" / "COMPLETE").is_file()
    # the engine's log-probs and Megatron's recomputation agree (same weights, fp32)
    assert all(r["rollout_logp_abs_diff_max"] < 1e-4 for r in updates(rows))


@pytest.mark.parametrize("nproc, overrides", [
    (1, ["parallel.distributed_optimizer=true"]),
    (1, ["parallel.distributed_optimizer=false"]),
    pytest.param(2, ["parallel.tp=2"], marks=pytest.mark.slow),
], ids=["distopt", "plainopt", "tp2"])
def test_resume_continues_bit_identically(tmp_path, nproc, overrides):
    """4 steps straight == 2 steps, stop, --resume, 2 more steps (same layout)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_train(straight, "train.steps=4", *overrides, nproc=nproc).returncode == 0
    first = run_train(resumed, "train.steps=2", *overrides, nproc=nproc)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_train(resumed, "train.steps=4", *overrides, nproc=nproc, resume=True)
    assert second.returncode == 0, second.stderr[-3000:]
    a, b = metrics(straight), metrics(resumed)
    assert [r["step"] for r in b] == [0, 1, 2, 3]
    for ra, rb in zip(a, b):
        for key in ("loss", "grad_norm", "reward_mean", "entropy", "kl", "log_ratio_max"):
            assert ra.get(key) == rb.get(key), (ra["step"], key, ra.get(key), rb.get(key))


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    result = run_train(tmp_path / "none", "train.steps=1", resume=True)
    assert result.returncode != 0
    assert "no finished checkpoint" in result.stderr


def test_malformed_dataset_row_names_row_and_column(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "1+1=", "ground_truth": "2"}) + "\n" + json.dumps({"prompt": "2+2="}) + "\n")
    result = run_train(tmp_path / "run", "train.steps=1", f"data.train_files=[{bad}]", "data.task=null")
    assert result.returncode != 0
    assert "row 1" in result.stderr and "ground_truth" in result.stderr


def export_hf(run_dir: Path, out: Path) -> dict:
    """The run's final checkpoint as HF tensors, through gmpo-convert: loaded with dist_checkpointing
    into a one-process (TP1/PP1/EP1) model, so a checkpoint saved at any layout must reload here."""
    from safetensors.torch import load_file

    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    cmd = [sys.executable, "-m", "gmpo_megatron.convert.cli", "megatron-to-hf",
           "--megatron-dir", str(run_dir / "checkpoints" / latest), "--hf-config-dir", str(run_dir / "hf"),
           "--out-dir", str(out), "--reader", "model"]  # dist_checkpointing load at TP1/PP1/EP1
    result = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    tensors = {}
    for path in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    result = run_train(root / "run", "train.steps=2", *LAYOUT_LR)
    assert result.returncode == 0, result.stderr[-3000:]
    return metrics(root / "run"), export_hf(root / "run", root / "hf")


LAYOUT_LR = ["train.lr=2e-4"]


LAYOUTS = {
    "tp2_sp": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2"]),
    "ep2_alltoall": (2, ["parallel.ep=2"]),
    "ep2_allgather": (2, ["parallel.ep=2", "parallel.moe_dispatcher=allgather"]),
    "ep2_allgather_padded": (2, ["parallel.ep=2", "parallel.moe_dispatcher=allgather", "train.packing=false",
                                 "train.micro_batch_size=3"]),
    "tp2_ep2_etp1": (2, ["parallel.tp=2", "parallel.ep=2", "parallel.etp=1"]),
    "dp2": (2, []),
    "tp2_pp2": (4, ["parallel.tp=2", "parallel.pp=2"]),
    "ep2_pp2": (4, ["parallel.ep=2", "parallel.pp=2"]),
    # context parallel (the local spec's all-gather CP attention): packed rows split as one row,
    # padded rows (each padded to a multiple of 2*CP), and with TP+SP / EP on 4 processes
    "cp2_packed": (2, ["parallel.cp=2"]),
    "cp2_padded": (2, ["parallel.cp=2", "train.packing=false", "train.micro_batch_size=3"]),
    "cp2_tp2_sp": (4, ["parallel.cp=2", "parallel.tp=2"]),
    "cp2_ep2": (4, ["parallel.cp=2", "parallel.ep=2"]),
    "cp2_pp2": (4, ["parallel.cp=2", "parallel.pp=2"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_single_process(tmp_path, layout, single_process_run):
    """Two full GMPO steps (rollout, old log-probs, 2 optimizer steps each, weight sync) at a
    parallel layout: same rewards, loss (1e-6), grad norm (1e-5 rel.) and every trained weight
    (1e-5, compared after export to HF, i.e. gathered over TP/EP/PP).

    lr is 2e-4 here: Adam divides each gradient element by its own magnitude, so the float
    rounding of a near-zero gradient element (different summation order at another layout) can
    move that weight by up to ~lr per step; at the demo's 2e-3 that alone reaches 1e-5."""
    nproc, overrides = LAYOUTS[layout]
    single_rows, single_weights = single_process_run
    result = run_train(tmp_path / "run", "train.steps=2", *LAYOUT_LR, *overrides, nproc=nproc, timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]
    rows = metrics(tmp_path / "run")
    assert len(rows) == len(single_rows) == 2
    assert [r["reward_mean"] for r in rows] == [r["reward_mean"] for r in single_rows]
    assert [r["skipped"] for r in rows] == [r["skipped"] for r in single_rows]
    for ra, rb in zip(updates(single_rows), updates(rows)):
        assert ra["num_samples"] == rb["num_samples"]
        assert abs(ra["loss"] - rb["loss"]) <= 1e-6
        assert abs(ra["grad_norm"] - rb["grad_norm"]) <= 1e-5 * max(1.0, abs(ra["grad_norm"]))
    assert single_rows[1]["grad_norm"] > 0  # the comparison covers a real update
    weights = export_hf(tmp_path / "run", tmp_path / "hf")
    assert set(weights) == set(single_weights)
    for name, tensor in single_weights.items():
        assert (weights[name] - tensor).abs().max().item() <= 1e-5, name


def _save_tiny_hf(directory: Path, **overrides) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from gmpo_megatron.models.presets import tiny_qwen3_moe

    torch.manual_seed(5)
    AutoModelForCausalLM.from_config(tiny_qwen3_moe(**overrides)).save_pretrained(
        str(directory), max_shard_size="100KB")


def test_starts_from_a_local_hf_checkpoint(tmp_path):
    _save_tiny_hf(tmp_path / "hf")
    # dynamic sampling: step 0 draws prompts until it has informative groups, so it trains and
    # measures the engine / Megatron log-prob mismatch (a skipped step has no old-log-prob pass)
    result = run_train(tmp_path / "run", "train.steps=1", "model.hf_config=null",
                       f"model.hf_checkpoint={tmp_path / 'hf'}", "algorithm.dynamic_sampling=true")
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = updates(metrics(tmp_path / "run"))
    assert row["rollout_logp_abs_diff_max"] < 1e-4


def test_hf_checkpoint_missing_a_tensor_is_refused(tmp_path):
    import json as _json

    from safetensors.torch import load_file, save_file

    _save_tiny_hf(tmp_path / "hf")
    index = _json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    victim = "model.layers.1.mlp.experts.3.up_proj.weight"
    shard = tmp_path / "hf" / index["weight_map"][victim]
    tensors = load_file(str(shard))
    del tensors[victim]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    del index["weight_map"][victim]
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(_json.dumps(index))
    result = run_train(tmp_path / "run", "train.steps=1", "model.hf_config=null",
                       f"model.hf_checkpoint={tmp_path / 'hf'}")
    assert result.returncode != 0
    assert victim in result.stderr and "missing" in result.stderr


def test_hf_checkpoint_disagreeing_with_hf_config_is_refused(tmp_path):
    _save_tiny_hf(tmp_path / "hf", rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    result = run_train(tmp_path / "run", "train.steps=1", f"model.hf_checkpoint={tmp_path / 'hf'}")
    assert result.returncode != 0
    assert "rope" in result.stderr.lower()


@pytest.fixture(scope="module")
def single_process_r2_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("single_r2")
    result = run_train(root / "run", "train.steps=2", "moe.routing_replay=r2", *LAYOUT_LR)
    assert result.returncode == 0, result.stderr[-3000:]
    return metrics(root / "run")


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["parallel.ep=2"], ["parallel.tp=2"], ["parallel.cp=2"]],
                         ids=["ep2", "tp2_sp", "cp2"])
def test_routing_replay_r2_matches_single_process(tmp_path, layout, single_process_r2_run):
    """R2 records routes per sample in the old-log-prob pass and replays them in the update
    micro-batches (other shapes, other DP ranks, TP-split under sequence parallelism, 2*CP-split
    under context parallelism)."""
    result = run_train(tmp_path / "run", "train.steps=2", "moe.routing_replay=r2", *LAYOUT_LR, *layout, nproc=2)
    assert result.returncode == 0, result.stderr[-5000:]
    assert updates(single_process_r2_run)  # at least one step trained
    for ra, rb in zip(updates(single_process_r2_run), updates(metrics(tmp_path / "run"))):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-6
        assert abs(ra["grad_norm"] - rb["grad_norm"]) <= 1e-5 * max(1.0, abs(ra["grad_norm"]))
        assert ra["moe_load_max_layer0"] == rb["moe_load_max_layer0"]


@pytest.mark.slow
def test_uneven_pipeline_stages_match_single_process(tmp_path):
    """PP2 with a 1-layer first stage and a 2-layer last stage (how 94 layers are split) on a
    3-layer tiny MoE written as a local HF config dir: same loss, grad norm and weights."""
    from gmpo_megatron.models.presets import tiny_qwen3_moe

    tiny_qwen3_moe(num_hidden_layers=3).save_pretrained(str(tmp_path / "three_layers"))
    model = [f"model.hf_config={tmp_path / 'three_layers'}", "train.steps=2", *LAYOUT_LR]
    single = run_train(tmp_path / "single", *model)
    assert single.returncode == 0, single.stderr[-3000:]
    uneven = run_train(tmp_path / "uneven", *model, "parallel.pp=2", "parallel.pp_first_stage_layers=1",
                       nproc=2)
    assert uneven.returncode == 0, uneven.stderr[-5000:]
    assert updates(metrics(tmp_path / "single"))  # at least one step trained
    for ra, rb in zip(updates(metrics(tmp_path / "single")), updates(metrics(tmp_path / "uneven"))):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-6
        assert abs(ra["grad_norm"] - rb["grad_norm"]) <= 1e-5 * max(1.0, abs(ra["grad_norm"]))
    a, b = export_hf(tmp_path / "single", tmp_path / "hf_a"), export_hf(tmp_path / "uneven", tmp_path / "hf_b")
    assert set(a) == set(b)
    assert all((a[k] - b[k]).abs().max().item() <= 1e-5 for k in a)


def test_a_second_run_into_the_same_output_dir_is_refused(tmp_path):
    assert run_train(tmp_path / "run", "train.steps=1").returncode == 0
    again = run_train(tmp_path / "run", "train.steps=1")
    assert again.returncode != 0
    assert "already holds a run" in again.stderr and "--resume" in again.stderr
