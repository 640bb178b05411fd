"""Every pickle on a checkpoint load path is restricted: crafted files are refused by name, real
checkpoints (trainer with DistributedOptimizer / plain optimizer, both converters) still load."""

import io
import os
import pickle

import pytest
import torch

from gmpo_megatron.megatron import checkpoint as ckpt
from gmpo_megatron.megatron import safe_load
from gmpo_megatron.megatron.model_builder import BuildOptions, build_model
from gmpo_megatron.megatron.optimizer import OptimSettings, build_optimizer, wrap_ddp
from gmpo_megatron.models.presets import tiny_qwen3_moe


class RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _model_and_optimizer(distributed_optimizer: bool):
    torch.manual_seed(0)
    model = wrap_ddp(build_model(tiny_qwen3_moe(num_hidden_layers=1), BuildOptions()),
                     distributed_optimizer)
    optimizer, _ = build_optimizer(model, OptimSettings(
        lr=1e-3, min_lr=0.0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8,
        grad_clip=1.0, warmup_steps=0, total_steps=10,
        distributed_optimizer=distributed_optimizer, bf16=False))
    return model, optimizer


@pytest.fixture(params=[True, False], ids=["distopt", "plainopt"])
def saved(request, tmp_path, megatron_single_process):
    model, optimizer = _model_and_optimizer(request.param)
    # As after one optimizer step: megatron-core 0.16.1's plain optimizer drops a zero Adam step
    # from its sharded state (`if step:`), and the reload then fails in torch Adam (KeyError).
    ckpt.init_optimizer_state(optimizer)
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in sub.optimizer.state.values():
            state["step"] = torch.ones((), dtype=torch.float32)
    path = ckpt.save_checkpoint(tmp_path / "checkpoints", 1, model, optimizer, {"data_position": 3})
    return path, model, optimizer


def _globals_of(path) -> set[str]:
    found = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            found.add(f"{module}.{name}")
            return super().find_class(module, name)

    with open(path, "rb") as f:
        Recorder(f).load()
    return found


def test_real_trainer_checkpoints_load_through_the_restricted_readers(saved, tmp_path):
    path, model, optimizer = saved
    assert ckpt.load_checkpoint(path, model, optimizer)["data_position"] == 3
    recorded = _globals_of(path / ".metadata")
    assert all(safe_load._allowed(*name.rsplit(".", 1)) for name in recorded), recorded


def test_converter_outputs_hold_only_allowed_metadata_globals(tmp_path):
    from transformers import AutoModelForCausalLM

    from gmpo_megatron.convert.hf_to_megatron import convert_hf_to_megatron

    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(tiny_qwen3_moe(num_hidden_layers=1)).save_pretrained(
        str(tmp_path / "hf"))
    convert_hf_to_megatron(str(tmp_path / "hf"), str(tmp_path / "mcore"), writer="stream",
                           log=lambda message: None)
    recorded = _globals_of(tmp_path / "mcore" / ".metadata")
    assert all(safe_load._allowed(*name.rsplit(".", 1)) for name in recorded), recorded


def _rewrite_manifest(directory):
    """An attacker who can write the files can rewrite the checksums too."""
    if (directory / "MANIFEST.json").exists():
        from gmpo_megatron.megatron.checkpoint_manifest import rewrite_manifest

        rewrite_manifest(directory)


def test_a_byte_entry_that_runs_code_is_refused_naming_its_file(saved, tmp_path):
    """Replace one ``_extra_state`` byte entry with a record that runs code when unpickled."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    path, model, optimizer = saved
    metadata = FileSystemReader(str(path)).read_metadata()
    key = next(k for k, v in metadata.state_dict_metadata.items()
               if isinstance(v, BytesStorageMetadata))
    index, info = next((i, s) for i, s in metadata.storage_data.items() if i.fqn == key)
    crafted = io.BytesIO()
    torch.save(RunsCode(tmp_path / "code_ran"), crafted)
    distcp = path / info.relative_path
    offset = distcp.stat().st_size
    with open(distcp, "ab") as f:
        f.write(crafted.getvalue())
    info.offset, info.length = offset, len(crafted.getvalue())
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    _rewrite_manifest(path)

    with pytest.raises(safe_load.UnsafeCheckpointError) as refused:
        ckpt.load_checkpoint(path, model, optimizer)
    assert not (tmp_path / "code_ran").exists()
    assert str(distcp) in str(refused.value) and "posix.system" in str(refused.value)


def test_common_pt_that_runs_code_is_refused_even_when_torch_is_told_to_trust_it(
        saved, tmp_path, monkeypatch):
    path, model, optimizer = saved
    torch.save({"optimizer": RunsCode(tmp_path / "code_ran")}, path / "common.pt")
    _rewrite_manifest(path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(safe_load.UnsafeCheckpointError) as refused:
        ckpt.load_checkpoint(path, model, optimizer)
    assert not (tmp_path / "code_ran").exists()
    assert str(path / "common.pt") in str(refused.value) and "posix.system" in str(refused.value)


def test_metadata_that_is_not_dcp_metadata_is_refused(tmp_path):
    (tmp_path / ".metadata").write_bytes(pickle.dumps({"a": 1}))
    with open(tmp_path / ".metadata", "rb") as f, pytest.raises(safe_load.UnsafeCheckpointError,
                                                               match="dict at the top level"):
        safe_load.load_dcp_metadata(f, str(tmp_path / ".metadata"))
