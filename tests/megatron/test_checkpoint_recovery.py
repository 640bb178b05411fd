"""A damaged checkpoint is named, file by file, and passed over for the previous finished one."""

import pytest
import torch

from gmpo_megatron.megatron import checkpoint as ckpt
from gmpo_megatron.megatron.model_builder import BuildOptions, build_model
from gmpo_megatron.megatron.optimizer import OptimSettings, build_optimizer, wrap_ddp
from gmpo_megatron.models.presets import tiny_qwen3_moe


@pytest.fixture()
def two_checkpoints(tmp_path, megatron_single_process):
    torch.manual_seed(0)
    model = wrap_ddp(build_model(tiny_qwen3_moe(num_hidden_layers=1), BuildOptions()), True)
    optimizer, _ = build_optimizer(model, OptimSettings(
        lr=1e-3, min_lr=0.0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8,
        grad_clip=1.0, warmup_steps=0, total_steps=10, distributed_optimizer=True, bf16=False))
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        ckpt.save_checkpoint(root, step, model, optimizer, {"data_position": step})
    return root, model, optimizer


def _largest_distcp(path):
    return max(path.glob("*.distcp"), key=lambda p: p.stat().st_size)


def test_a_scrambled_byte_inside_a_tensor_is_named(two_checkpoints):
    root, model, optimizer = two_checkpoints
    distcp = _largest_distcp(root / "step_000002")
    data = bytearray(distcp.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one tensor byte changed: torch.load would not notice
    distcp.write_bytes(bytes(data))
    with pytest.raises(ckpt.DamagedCheckpointError, match="does not match its checksum") as error:
        ckpt.load_checkpoint(root / "step_000002", model, optimizer)
    assert str(distcp) in str(error.value)


def test_a_truncated_file_is_named(two_checkpoints):
    root, model, optimizer = two_checkpoints
    distcp = _largest_distcp(root / "step_000002")
    distcp.write_bytes(distcp.read_bytes()[:100])
    with pytest.raises(ckpt.DamagedCheckpointError, match="truncated") as error:
        ckpt.load_checkpoint(root / "step_000002", model, optimizer)
    assert str(distcp) in str(error.value)


def test_without_a_manifest_a_torn_file_is_still_named_as_damage(two_checkpoints):
    """Checkpoints saved before manifests existed: a failed read is reported as damage."""
    root, model, optimizer = two_checkpoints
    (root / "step_000002" / "MANIFEST.json").unlink()
    distcp = _largest_distcp(root / "step_000002")
    distcp.write_bytes(distcp.read_bytes()[:100])
    with pytest.raises(ckpt.DamagedCheckpointError, match="no MANIFEST.json to check"):
        ckpt.load_checkpoint(root / "step_000002", model, optimizer)


def test_newest_intact_passes_over_unfinished_and_damaged_checkpoints(two_checkpoints):
    root, model, optimizer = two_checkpoints
    ckpt.save_checkpoint(root, 3, model, optimizer, {"data_position": 3}, keep_last=3)
    (root / "step_000003" / "COMPLETE").unlink()
    (root / "step_000002" / "trainer_state.json").write_text("{")
    warnings = []
    path, state, passed_over = ckpt.load_newest_intact(root, model, optimizer, warnings.append)
    assert path == root / "step_000001" and state["data_position"] == 1
    assert "step_000003 has no COMPLETE marker" in warnings[0]
    assert "trainer_state.json" in warnings[1] and "falling back" in warnings[1]
    assert (root / "step_000002.damaged").is_dir() and len(passed_over) == 2
    assert ckpt.finished_checkpoints(root) == [root / "step_000001"]
    assert (root / "latest").read_text().strip() == "step_000001"


def test_no_intact_checkpoint_is_refused_with_the_fix(two_checkpoints):
    root, model, optimizer = two_checkpoints
    for step in ("step_000001", "step_000002"):
        (root / step / "common.pt").write_bytes(b"")
    with pytest.raises(ckpt.DamagedCheckpointError, match="no intact checkpoint") as error:
        ckpt.load_newest_intact(root, model, optimizer, lambda message: None)
    assert "common.pt" in str(error.value) and "--resume to start again" in str(error.value)
