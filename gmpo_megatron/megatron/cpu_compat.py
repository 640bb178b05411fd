"""Megatron-Core 0.16.1 on a CPU-only torch, with the gloo backend.

Megatron-Core assumes CUDA in a few dozen places (tests/megatron/test_cpu_compat.py has one test per place it bridges). This module is the
one place that bridges them, and it does so only when ``torch.cuda.is_available()`` is False: on a
GPU machine ``apply()`` applies only the upstream bug fixes (``upstream_fixes.py``), which are
needed whenever Transformer-Engine / Apex are absent (see patches/README.md).

Three mechanisms, each narrow:

1. A ``torch`` proxy installed as the ``torch`` global of every ``megatron.core`` module. Through it
   ``torch.cuda`` is a CPU shim (streams and events are no-ops, ``current_device()`` is the CPU
   device, the RNG calls drive the CPU generator), tensor factories map ``device="cuda"`` to the CPU,
   and ``torch.distributed`` adapts two collectives that gloo lacks (split sizes as plain lists for
   ``all_to_all_single``; uneven ``all_gather`` by pad-gather-trim). Code outside Megatron never sees
   the proxy.
2. Checked source rewrites (``source_rewrite.py``) of the few functions that compare
   ``tensor.type()`` with ``'torch.cuda.FloatTensor'`` or call ``.cuda()``: each rewrite asserts
   that the text it replaces is present, so a megatron-core upgrade fails loudly here.
3. The RNG tracker reads and writes the CPU generator state.

The norm that refuses sequence parallelism (``WrappedTorchNorm``) is not patched: our layer spec uses
:class:`gmpo_megatron.megatron.norms.TorchNorm` instead (model choice is made by the spec).
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types
from typing import Any

import torch
import torch.distributed as dist

from gmpo_megatron.megatron.source_rewrite import SUPPORTED_MEGATRON_VERSION, rewrite_function
from gmpo_megatron.megatron.upstream_fixes import apply_upstream_fixes

_applied = False

# Megatron modules whose globals receive the proxy. Imported here so they exist before patching;
# modules imported later are caught by the sweep in ``apply()`` run again by the model builder.
_MEGATRON_MODULES = (
    "megatron.core.parallel_state",
    "megatron.core.utils",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.cross_entropy",
    "megatron.core.tensor_parallel.data",
    "megatron.core.fusions.fused_softmax",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.transformer_block",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.moe.moe_layer",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.moe.router",
    "megatron.core.transformer.moe.experts",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.common.language_module.language_module",
    "megatron.core.models.common.embeddings.language_model_embedding",
    "megatron.core.models.common.embeddings.rope_utils",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.serialization",
)

# (module, qualified function name, [(old text, new text), ...]): every `old` must be present.
_CUDA_TYPE = [("'torch.cuda.", "'torch.")]
_DOT_CUDA = [(".cuda()", ".to(torch.cuda.current_device())")]
_SOURCE_REWRITES = (
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32", _CUDA_TYPE),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__", _CUDA_TYPE),
    ("megatron.core.optimizer.distrib_optimizer",
     "DistributedOptimizer._build_model_and_main_param_groups", _CUDA_TYPE),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.__init__", _CUDA_TYPE),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.get_parameter_state_dp_zero",
     _DOT_CUDA),
    ("megatron.core.models.common.language_module.language_module",
     "LanguageModule.setup_embeddings_and_output_layer", _DOT_CUDA),
    ("megatron.core.dist_checkpointing.exchange_utils", "exchange_loaded_tensors_gather_rounds",
     _DOT_CUDA),
    ("megatron.core.dist_checkpointing.exchange_utils", "exchange_loaded_tensors_broadcast",
     _DOT_CUDA),
    # context parallel: the rank's rotary chunks are indexed with a pinned tensor moved to CUDA
    ("megatron.core.models.common.embeddings.rope_utils", "get_pos_emb_on_this_cp_rank",
     [('device="cpu", pin_memory=True\n    ).cuda(non_blocking=True)', "device=pos_emb.device)")]),
)


def cuda_absent() -> bool:
    return not torch.cuda.is_available()


# --------------------------------------------------------------------------------------------
# 1. The torch proxy
# --------------------------------------------------------------------------------------------


class _NullStream:
    """Stands for a CUDA stream or event: on CPU all work is already ordered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        # wait_stream, wait_event, record_event, record, synchronize, query, ...
        if name in ("query",):
            return lambda *a, **k: True
        if name == "record_event":
            return lambda *a, **k: _NullStream()
        if name == "elapsed_time":
            return lambda *a, **k: 0.0
        return lambda *a, **k: None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _NullStream)

    def __hash__(self) -> int:
        return 0


class _NvtxShim:
    @staticmethod
    def range_push(*args: Any, **kwargs: Any) -> None:
        return None

    @staticmethod
    def range_pop(*args: Any, **kwargs: Any) -> None:
        return None

    @staticmethod
    def mark(*args: Any, **kwargs: Any) -> None:
        return None

    @staticmethod
    def range(*args: Any, **kwargs: Any):
        return contextlib.nullcontext()


_CPU = torch.device("cpu")


class _CudaShim(types.ModuleType):
    """What Megatron sees as ``torch.cuda`` on a CPU-only machine."""

    Stream = _NullStream
    Event = _NullStream
    nvtx = _NvtxShim()

    def __init__(self) -> None:
        super().__init__("torch.cuda(cpu shim)")
        self.random = types.SimpleNamespace(
            get_rng_state=self.get_rng_state,
            set_rng_state=self.set_rng_state,
            manual_seed=self.manual_seed,
        )

    @staticmethod
    def current_device() -> torch.device:
        return _CPU

    @staticmethod
    def synchronize(*args: Any, **kwargs: Any) -> None:
        return None

    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def current_stream(*args: Any, **kwargs: Any) -> _NullStream:
        return _NullStream()

    default_stream = current_stream

    @staticmethod
    def set_stream(*args: Any, **kwargs: Any) -> None:
        return None

    @staticmethod
    def stream(*args: Any, **kwargs: Any):
        return contextlib.nullcontext()

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    manual_seed_all = manual_seed

    @staticmethod
    def get_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        torch.set_rng_state(state)

    @staticmethod
    def memory_allocated(*args: Any, **kwargs: Any) -> int:
        return 0

    memory_reserved = max_memory_allocated = memory_allocated

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


_FACTORIES = (
    "zeros", "ones", "empty", "full", "tensor", "as_tensor", "arange", "rand", "randn",
    "randint", "randperm", "zeros_like", "ones_like", "empty_like", "full_like", "linspace",
    "eye", "tril_indices", "triu_indices",
)


def _cpu_factory(fn):
    def factory(*args: Any, **kwargs: Any):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        return fn(*args, **kwargs)

    factory.__name__ = getattr(fn, "__name__", "factory")
    factory.__wrapped__ = fn
    return factory


def _as_split_list(splits: Any) -> Any:
    if splits is None:
        return None
    if isinstance(splits, torch.Tensor):
        return [int(s) for s in splits.tolist()]
    return [int(s) for s in splits]


class _GlooDistributed(types.ModuleType):
    """``torch.distributed`` for Megatron on gloo: two collectives gloo lacks in the needed form."""

    def __init__(self) -> None:
        super().__init__("torch.distributed(gloo adapter)")

    @staticmethod
    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None,
                          group=None, async_op=False):
        # gloo accepts only python lists of ints; the dispatcher passes numpy arrays / tensors.
        return dist.all_to_all_single(
            output, input, output_split_sizes=_as_split_list(output_split_sizes),
            input_split_sizes=_as_split_list(input_split_sizes), group=group, async_op=async_op,
        )

    @staticmethod
    def all_gather(tensor_list, tensor, group=None, async_op=False):
        shapes = [t.shape for t in tensor_list]
        if all(s == tensor.shape for s in shapes) or dist.get_backend(group) != "gloo":
            return dist.all_gather(tensor_list, tensor, group=group, async_op=async_op)
        # gloo has no uneven all_gather: pad every piece along dim 0 to the largest, gather, trim.
        longest = max(s[0] for s in shapes)
        padded = tensor.new_zeros((longest,) + tuple(tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        gathered = [torch.empty_like(padded) for _ in tensor_list]
        dist.all_gather(gathered, padded, group=group)
        for out, piece, shape in zip(tensor_list, gathered, shapes):
            out.copy_(piece[: shape[0]])
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(dist, name)


class _TorchProxy(types.ModuleType):
    """The ``torch`` module as Megatron modules see it after ``apply()``."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CudaShim()
        self.distributed = _GlooDistributed()
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        value = getattr(torch, name)
        setattr(self, name, value)  # cache: later lookups are a plain attribute read
        return value


_PROXY: _TorchProxy | None = None


def _install_proxy() -> int:
    """Point the ``torch`` global of every loaded megatron.core module at the proxy."""
    global _PROXY
    if _PROXY is None:
        _PROXY = _TorchProxy()
    count = 0
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("megatron.core"):
            continue
        if getattr(module, "torch", None) is torch:
            module.torch = _PROXY
            count += 1
    return count


# --------------------------------------------------------------------------------------------
# 2. Checked source rewrites (gmpo_megatron.megatron.source_rewrite)
# --------------------------------------------------------------------------------------------


def _apply_source_rewrites() -> None:
    for module_name, qualname, replacements in _SOURCE_REWRITES:
        rewrite_function(module_name, qualname, replacements)


# --------------------------------------------------------------------------------------------
# 3. RNG tracker on the CPU generator
# --------------------------------------------------------------------------------------------


def _patch_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    def _get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
        return torch.get_rng_state()

    def _set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False):
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = _get_rng_state
    mrandom._set_cuda_rng_state = _set_rng_state


def apply() -> bool:
    """Make megatron-core usable on this machine; idempotent, cheap to call again.

    On a CUDA machine only the ``te_general_gemm`` fix applies. Returns True when the CPU layer is
    active. Call it after importing megatron modules lazily imported by your code path, too: the
    sweep points newly loaded megatron modules at the proxy.
    """
    global _applied
    import megatron.core

    apply_upstream_fixes()
    if not cuda_absent():
        return False  # nothing of the CPU layer applies, so any megatron-core version is fine
    # the proxy, rewrites and RNG patch are written against this version's source
    version = getattr(megatron.core, "__version__", None)
    if version is not None and version != SUPPORTED_MEGATRON_VERSION:
        raise RuntimeError(
            f"running Megatron-Core on a CPU-only torch needs megatron-core=={SUPPORTED_MEGATRON_VERSION}, "
            f"found {version}: pip install megatron-core=={SUPPORTED_MEGATRON_VERSION} (on a CUDA "
            "machine any version works: this layer does not apply there)"
        )
    for name in _MEGATRON_MODULES:  # the modules the proxy must reach
        importlib.import_module(name)
    _install_proxy()
    if not _applied:
        _apply_source_rewrites()
        _patch_rng()
        _applied = True
    return True
