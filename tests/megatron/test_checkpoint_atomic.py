"""A checkpoint save that dies midway never damages the previous checkpoint or 'latest'."""

import pytest
import torch

from gmpo_megatron.megatron import checkpoint as ckpt
from gmpo_megatron.megatron.model_builder import BuildOptions, build_model
from gmpo_megatron.megatron.optimizer import OptimSettings, build_optimizer, wrap_ddp
from gmpo_megatron.models.presets import tiny_qwen3_moe


@pytest.fixture()
def model_and_optimizer(megatron_single_process):
    torch.manual_seed(0)
    model = wrap_ddp(build_model(tiny_qwen3_moe(num_hidden_layers=1), BuildOptions()), True)
    optimizer, _ = build_optimizer(model, OptimSettings(
        lr=1e-3, min_lr=0.0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8,
        grad_clip=1.0, warmup_steps=0, total_steps=10, distributed_optimizer=True, bf16=False))
    return model, optimizer


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch, model_and_optimizer):
    from megatron.core import dist_checkpointing

    model, optimizer = model_and_optimizer
    root = tmp_path / "checkpoints"
    first = ckpt.save_checkpoint(root, 1, model, optimizer, {"data_position": 7})
    files_before = sorted(p.name for p in first.iterdir())

    def dies_midway(state, directory, *args, **kwargs):
        (tmp_path / "checkpoints" / "step_000002.tmp" / "partial.distcp").write_bytes(b"half")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(dist_checkpointing, "save", dies_midway)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(root, 2, model, optimizer, {"data_position": 9})
    monkeypatch.undo()

    assert (root / "latest").read_text().strip() == "step_000001"
    assert ckpt.latest_checkpoint(root) == first
    assert sorted(p.name for p in first.iterdir()) == files_before
    assert not (root / "step_000002").exists()
    # the interrupted save is never taken for a checkpoint, and the next save clears it away
    with pytest.raises(FileNotFoundError, match="not a finished checkpoint"):
        ckpt.load_checkpoint(root / "step_000002.tmp", model, optimizer)
    second = ckpt.save_checkpoint(root, 2, model, optimizer, {"data_position": 9})
    assert not (root / "step_000002.tmp").exists()
    assert ckpt.latest_checkpoint(root) == second


def test_keep_last_prunes_older_checkpoints(tmp_path, model_and_optimizer):
    model, optimizer = model_and_optimizer
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        ckpt.save_checkpoint(root, step, model, optimizer, {}, keep_last=2)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000002", "step_000003"]
    state = ckpt.load_checkpoint(root / "step_000003", model, optimizer)
    assert state["step"] == 3
