"""The CPU compatibility layer: one test per item it bridges."""

import pytest
import torch

from gmpo_megatron.megatron import cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the layer is inactive with CUDA")


def test_apply_is_idempotent_and_reports_cpu(megatron_single_process):
    assert cpu_compat.apply() is True
    assert cpu_compat.apply() is True


def test_megatron_modules_see_cpu_cuda_shim(megatron_single_process):
    from megatron.core.transformer.moe import token_dispatcher

    shim = token_dispatcher.torch.cuda
    assert shim.current_device() == torch.device("cpu")
    stream = shim.Stream()
    with shim.stream(stream):
        shim.synchronize()
    assert stream.record_event().query() is True
    # code outside Megatron keeps the real torch
    assert torch.cuda.current_device is not shim.current_device


def test_literal_cuda_factories_land_on_cpu(megatron_single_process):
    from megatron.core.pipeline_parallel import schedules

    t = schedules.torch.zeros([], dtype=torch.int, device="cuda")
    assert t.device.type == "cpu"
    t = schedules.torch.ones(2, device=torch.device("cuda"))
    assert t.device.type == "cpu"


def test_rng_tracker_forks_the_cpu_generator(megatron_single_process):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.manual_seed(123)
    before = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)  # the fork restores the default state
    with get_cuda_rng_tracker().fork():
        b = torch.rand(3)
    assert not torch.equal(a, b)  # ...and advances the tracked one


def test_type_string_checks_are_rewritten(megatron_single_process):
    from megatron.core.optimizer import clip_grads, optimizer

    assert clip_grads.clip_grad_by_total_norm_fp32.__code__.co_filename.startswith("<gmpo cpu_compat")
    assert optimizer.clip_grad_by_total_norm_fp32 is clip_grads.clip_grad_by_total_norm_fp32
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 10.0)
    clip_grads.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=20.0)
    assert torch.allclose(p.grad, torch.full((4,), 0.5), atol=1e-5)


def test_rewrite_refuses_unknown_source():
    with pytest.raises(RuntimeError, match="megatron-core==0.16.1"):
        cpu_compat.rewrite_function("megatron.core.parallel_state", "get_tensor_model_parallel_rank",
                                    [("this text is not in the function", "x")])


def test_te_general_gemm_defined_without_te(megatron_single_process):
    from megatron.core.transformer.moe import moe_utils

    from gmpo_megatron.megatron import upstream_fixes

    assert "te_general_gemm" in moe_utils.__dict__
    assert upstream_fixes.fix_te_general_gemm() is False  # already fixed: nothing to do


def test_torch_adam_step_restore_fix_is_in_place(megatron_single_process):
    from megatron.core.optimizer import distrib_optimizer

    from gmpo_megatron.megatron import upstream_fixes

    if distrib_optimizer.HAVE_APEX_OR_TE:
        pytest.skip("the bug only exists on the torch-Adam path (no Apex / TE)")
    target = distrib_optimizer.DistributedOptimizer._set_main_param_and_optimizer_states
    assert target.__code__.co_filename.startswith("<gmpo")
    assert upstream_fixes.fix_torch_adam_step_restore() is False  # idempotent


def test_checkpoint_without_output_has_no_fp8_without_te(megatron_single_process):
    """Selective recompute of layernorm goes through CheckpointWithoutOutput(), whose default
    asked TE's FP8 state even without TE (NameError); tests/megatron/test_recompute.py trains with it."""
    from megatron.core.tensor_parallel import random as tp_random

    from gmpo_megatron.megatron import upstream_fixes

    if tp_random.HAVE_TE:
        pytest.skip("the bug only exists without Transformer-Engine")
    assert tp_random.CheckpointWithoutOutput().fp8 is False
    assert upstream_fixes.fix_checkpoint_without_output_fp8() is False  # idempotent


def test_every_patch_file_applies_to_the_installed_megatron(tmp_path):
    """Each patch in patches/ applies cleanly (patch -p1) to a copy of the file it targets, and the
    result holds the marker line patches/apply.py looks for (or the installed file is patched)."""
    import importlib.util
    import shutil
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "patches"
    spec = importlib.util.spec_from_file_location("patch_apply", root / "apply.py")
    apply = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(apply)
    import megatron.core

    # (not apply.site_root: under pytest, tests/megatron is also a portion of the `megatron` namespace)
    site = Path(megatron.core.__file__).resolve().parents[2]
    for name, (distribution, version, marker) in apply.PATCHES.items():
        assert distribution == "megatron-core"
        target = apply.target_file(root / name)
        installed = site / target
        if marker in installed.read_text():
            continue  # already applied in this environment
        copy = tmp_path / name / target
        copy.parent.mkdir(parents=True)
        shutil.copy(installed, copy)
        result = subprocess.run(["patch", "-p1", "--forward", "-d", str(tmp_path / name), "-i", str(root / name)],
                                capture_output=True, text=True)
        assert result.returncode == 0, (name, result.stdout, result.stderr)
        assert marker in copy.read_text(), name


def test_gloo_adapter_split_sizes_become_lists():
    assert cpu_compat._as_split_list(torch.tensor([1, 2])) == [1, 2]
    import numpy as np

    assert cpu_compat._as_split_list(np.array([3, 0])) == [3, 0]
    assert cpu_compat._as_split_list(None) is None


def test_the_version_is_checked_only_where_the_cpu_layer_applies(megatron_single_process, monkeypatch):
    """On CUDA the layer does nothing, so another megatron-core version is no reason to refuse."""
    import megatron.core

    monkeypatch.setattr(megatron.core, "__version__", "0.17.0")
    monkeypatch.setattr(cpu_compat, "cuda_absent", lambda: False)
    assert cpu_compat.apply() is False
    monkeypatch.setattr(cpu_compat, "cuda_absent", lambda: True)
    with pytest.raises(RuntimeError, match=r"on a CPU-only torch .*megatron-core==0.16.1, found 0.17.0"):
        cpu_compat.apply()


def test_rotary_chunks_of_a_context_parallel_rank_need_no_cuda(megatron_single_process):
    """Megatron indexes the rank's two rotary chunks with a pinned tensor moved to CUDA; on CPU the
    index is built on the table's device. Rank r of CP keeps chunks r and 2*CP-1-r."""
    from megatron.core.models.common.embeddings import rope_utils, rotary_pos_embedding

    class Group:  # what the function reads of a process group
        def __init__(self, rank, size):
            self._rank, self._size = rank, size

        def rank(self):
            return self._rank

        def size(self):
            return self._size

    assert rotary_pos_embedding.get_pos_emb_on_this_cp_rank is rope_utils.get_pos_emb_on_this_cp_rank
    table = torch.arange(12.0)[:, None, None, None]  # [s=12, 1, 1, 1]: value = position
    for rank, expected in ((0, [0, 1, 10, 11]), (1, [2, 3, 8, 9]), (2, [4, 5, 6, 7])):
        part = rope_utils.get_pos_emb_on_this_cp_rank(table, 0, Group(rank, 3))
        assert part.flatten().tolist() == expected
