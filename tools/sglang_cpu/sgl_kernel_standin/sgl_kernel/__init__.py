"""CPU stand-in for the few ``sgl_kernel`` names sglang 0.5.21 imports without a guard on its CPU
path (there is no CPU build of sglang-kernel on PyPI). Installed only into the SGLang server's own
virtualenv by ``tools/sglang_cpu/setup.sh``; never into the trainer's.

- ``assign_req_to_token_pool_cpu`` is called on every batch by ``srt/mem_cache/allocation.py``.
  It is written here in plain torch, from the semantics of sglang's own triton kernel
  ``assign_req_to_token_pool`` (same file).
- the speculative-decoding / KV-move kernels in ``_SPECULATIVE_NAMES`` are imported at module
  level (``speculative/*.py``, ``kernels/ops/speculative/*.py``, ``kernels/ops/kvcache/cache_move.py``)
  but only called with speculative decoding, which our servers never enable: each raises if called.

Any other name raises ``ImportError`` on ``from sgl_kernel import X`` (module ``__getattr__``
raising ``AttributeError``), so sglang's own fallbacks, which test for a missing kernel, stay in
charge.
"""

import torch

__version__ = "0.0.0+gmpo.cpu.standin"
SUPPORTED_SGLANG = "0.5.21"


def assign_req_to_token_pool_cpu(req_pool_indices: torch.Tensor, req_to_token: torch.Tensor,
                                 start_offset: torch.Tensor, end_offset: torch.Tensor,
                                 out_cache_loc: torch.Tensor, pool_len: int) -> None:
    """For request i: ``req_to_token[req_pool_indices[i], start[i]:end[i]]`` = the next
    ``end[i] - start[i]`` entries of ``out_cache_loc`` (requests' slots are back to back).

    req_pool_indices, start_offset, end_offset: [B] int; req_to_token: [pool, pool_len];
    out_cache_loc: [sum(end - start)] token slots.
    """
    if req_to_token.shape[1] != pool_len:
        raise ValueError(f"pool_len={pool_len} != req_to_token.shape[1]={req_to_token.shape[1]}")
    starts = start_offset.tolist()
    ends = end_offset.tolist()
    rows = req_pool_indices.tolist()
    offset = 0
    for row, start, end in zip(rows, starts, ends):
        count = end - start
        if count > 0:
            req_to_token[row, start:end] = out_cache_loc[offset:offset + count].to(req_to_token.dtype)
        offset += count


def _never_called(name: str):
    def kernel(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} (speculative decoding / KV-move kernel) is not provided by the gmpo "
            "CPU stand-in of sgl_kernel; do not enable speculative decoding on the CPU server"
        )

    kernel.__name__ = name
    return kernel


# Imported at module level on sglang's CPU path (speculative decoding, KV moves), never called by
# a plain server; each raises if it is.
_SPECULATIVE_NAMES = (
    "copy_all_layer_kv_cache_cpu",
    "build_tree_kernel_efficient_cpu",
    "verify_tree_greedy_cpu",
    "assign_extend_cache_locs_cpu",
    "assign_draft_cache_locs_contiguous_cpu",
    "rotate_input_ids_cpu",
    "fill_accept_out_cache_loc_cpu",
    "fill_bonus_tokens_cpu",
)
globals().update({name: _never_called(name) for name in _SPECULATIVE_NAMES})


def __getattr__(name: str):
    raise AttributeError(
        f"sgl_kernel.{name} is not provided by gmpo-megatron's CPU stand-in (only "
        "assign_req_to_token_pool_cpu and the never-called speculative names are)"
    )
