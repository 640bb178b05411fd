"""``gmpo-train rollout.sglang.weight_sync=distributed`` for real: the trainer broadcasts its
weights into a real SGLang CPU server (gloo weight-update group, flattened buckets) after every
update, one sender per pipeline stage; the server's log-probs equal the trainer's every step."""

import pytest
from test_sglang_train import CHECK, _kill_server_after_step, _launch, assert_synced, run_sglang
from test_train_cli import metrics

from gmpo_megatron.rollout.sglang_launch import live_group_members

pytestmark = pytest.mark.sglang

DISTRIBUTED = ["rollout.sglang.weight_sync=distributed", "rollout.sglang.bucket_mb=1"]


def test_tiny_run_broadcasts_its_weights_into_an_attached_server(tmp_path, sglang_server):
    server = sglang_server("moe")
    out = tmp_path / "run"
    result = run_sglang(out, "train.steps=3", f"rollout.sglang.urls=[{server.url}]", *DISTRIBUTED, *CHECK)
    assert result.returncode == 0, result.stderr[-4000:]
    assert_synced(metrics(out), 3)
    assert not (out / "weight_sync").exists(), "nothing goes by disk to an attached server"


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["parallel.pp=2"], ["parallel.ep=2"], ["parallel.tp=2"]],
                         ids=["pp2", "ep2", "tp2"])
def test_parallel_layouts_broadcast_the_whole_model(tmp_path, sglang_server, layout):
    """PP2: each stage's sender opens its own group and the stages send in turn; EP2 / TP2: the
    stage's sender streams the gathered tensors while the other rank takes part in the gathers."""
    server = sglang_server("moe")
    out = tmp_path / "run"
    result = run_sglang(out, "train.steps=2", f"rollout.sglang.urls=[{server.url}]", *DISTRIBUTED, *CHECK,
                        *layout, nproc=2)
    assert result.returncode == 0, result.stderr[-4000:]
    assert_synced(metrics(out), 2)
    assert not (out / "weight_sync").exists()


@pytest.mark.slow
def test_launched_servers_boot_from_disk_then_take_broadcasts(tmp_path):
    out = tmp_path / "run"
    # context 256: the read-back probe (24 tokens) must fit in the launched server's context
    result = run_sglang(out, "train.steps=3", *DISTRIBUTED, *CHECK,
                        *_launch(out, "rollout.sglang.launch.context_length=256"), timeout=1500)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = metrics(out)
    assert_synced(rows, 3)
    assert rows[-1]["weight_version"] > 1
    # only the boot version went by disk
    assert sorted(p.name for p in (out / "weight_sync").glob("v*")) == ["v000001"]


@pytest.mark.slow
def test_a_launched_server_that_dies_after_a_broadcast_is_not_restarted_from_stale_weights(tmp_path):
    out = tmp_path / "run"
    process = run_sglang(out, "train.steps=5", *DISTRIBUTED, *_launch(out), background=True)
    _kill_server_after_step(out, 2, process)
    _, stderr = process.communicate(timeout=1500)
    assert process.returncode != 0
    assert "weight_sync=distributed, so no directory holds them" in stderr, stderr[-4000:]
    pid = int((out / "sglang" / "server_0.pid").read_text())
    assert live_group_members(pid) == []  # zombies left for init are gone: they hold nothing
