"""Fixes for megatron-core 0.16.1 bugs that hit every machine without Transformer-Engine / Apex.

Each has a patch file in ``patches/`` (see patches/README.md) and this runtime equivalent, applied
only when the installed code still has the bug. ``apply_upstream_fixes()`` is called by
``cpu_compat.apply()`` on every machine, CUDA or not.
"""

from __future__ import annotations

import inspect

from gmpo_megatron.megatron.source_rewrite import rewrite_function


def fix_te_general_gemm() -> bool:
    """megatron-core 0.16.1 ``moe_utils`` only defines ``te_general_gemm`` when TE imports, but the
    router's gating function reads it unconditionally: NameError in every MoE forward without TE.
    Define it as None (what the upstream fix does) unless the patch file was already applied.
    Returns True when this call had to define it."""
    from megatron.core.transformer.moe import moe_utils

    if "te_general_gemm" in moe_utils.__dict__:
        return False
    moe_utils.te_general_gemm = None
    return True


_ADAM_STEP_FIX = [(
    # (text as in the dedented method source)
    """        for key in dst_tensors:
            dst_tensors[key].copy_(tensors[key])""",
    """        for key in dst_tensors:
            if key == "step" and key not in tensors:
                continue  # torch Adam's step is restored from param_groups, not per tensor
            dst_tensors[key].copy_(tensors[key])""",
)]


def fix_torch_adam_step_restore() -> bool:
    """megatron-core 0.16.1 bug without Apex/TE (torch Adam): loading a DistributedOptimizer
    checkpoint copies every optimizer-state key of a parameter from the checkpoint's tensors,
    including ``step``, which the checkpoint never holds per tensor: ``KeyError: 'step'`` on every
    resume. Skip ``step`` there (it is restored from param_groups). patches/README.md has the file.
    Returns True when this call applied the fix."""
    from megatron.core.optimizer import distrib_optimizer

    target = distrib_optimizer.DistributedOptimizer._set_main_param_and_optimizer_states
    if distrib_optimizer.HAVE_APEX_OR_TE or target.__code__.co_filename.startswith("<gmpo"):
        return False
    import linecache  # the patch file may already be applied: then the text is not there

    source = inspect.getsource(target)
    linecache.checkcache()
    if 'key == "step" and key not in tensors' in source:
        return False
    rewrite_function("megatron.core.optimizer.distrib_optimizer",
                     "DistributedOptimizer._set_main_param_and_optimizer_states", _ADAM_STEP_FIX)
    return True


_CHECKPOINT_FP8_FIX = [(
    "    self.fp8 = fp8 is not None",
    "    self.fp8 = HAVE_TE and fp8 is not None",
)]


def fix_checkpoint_without_output_fp8() -> bool:
    """megatron-core 0.16.1 ``CheckpointWithoutOutput(fp8=False)`` sets ``self.fp8 = fp8 is not
    None``, True for its default, so its forward asks TE's ``FP8GlobalStateManager`` whether FP8 is
    on: with TE that is a harmless run-time query, without TE a ``NameError`` in every
    output-discarding recompute (``train.recompute_modules: [layernorm]``). Without TE there is no
    FP8, so the flag is made False there; with TE the code is unchanged. patches/README.md has the
    file. Returns True when this call applied the fix."""
    from megatron.core.tensor_parallel import random as tp_random

    init = tp_random.CheckpointWithoutOutput.__init__
    if tp_random.HAVE_TE or init.__code__.co_filename.startswith("<gmpo"):
        return False
    if "HAVE_TE and fp8 is not None" in inspect.getsource(init):  # the patch file is applied
        return False
    rewrite_function("megatron.core.tensor_parallel.random", "CheckpointWithoutOutput.__init__",
                     _CHECKPOINT_FP8_FIX)
    return True


def apply_upstream_fixes() -> None:
    fix_te_general_gemm()
    fix_torch_adam_step_restore()
    fix_checkpoint_without_output_fp8()
