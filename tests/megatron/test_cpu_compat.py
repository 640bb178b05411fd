"""The CPU compatibility layer: one test per item it bridges (REFERENCE.md §2)."""

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


def test_gloo_adapter_split_sizes_become_lists():
    assert cpu_compat._as_split_list(torch.tensor([1, 2])) == [1, 2]
    import numpy as np

    assert cpu_compat._as_split_list(np.array([3, 0])) == [3, 0]
    assert cpu_compat._as_split_list(None) is None
