"""Buckets of HF tensors for ``weight_sync=distributed``: which tensors travel together in one
broadcast, and the byte layout of a bucket's flat buffer. Pure torch, no communication.

Plan. A pipeline stage sends its tensors in two passes, non-expert tensors first, then expert
tensors (``model.layers.N.mlp.experts.E.*``), each in stream order. A bucket holds consecutive
tensors of one pass while their total stays within ``bucket_bytes``; a tensor larger than that
travels alone in its own bucket (it cannot be split: the server rebuilds whole tensors). A tensor
whose offset in the bucket would not be a multiple of its element size also starts a new bucket:
the server views each tensor's bytes in place as its dtype, which torch refuses at a misaligned
offset (e.g. fp32 after an odd number of bf16 elements).

Layout. SGLang's ``load_format="flattened_bucket"`` (``srt/weight_sync/tensor_bucket.py``,
``FlattenedTensorBucket``) receives one ``uint8`` buffer per call: every tensor's bytes
(``tensor.flatten().view(uint8)``), concatenated in the order of the request's ``names``, with no
padding, whatever their dtypes. :func:`bucket_offsets` is that layout; :func:`flatten_bucket` and
:func:`unflatten_bucket` write and read it bit-exactly.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from gmpo_megatron.convert.safetensors_writer import TensorSpec

_EXPERT = re.compile(r"\.experts\.\d+\.")  # routed experts; Qwen2-MoE's shared_expert is not one


def is_expert_name(hf_name: str) -> bool:
    """``model.layers.3.mlp.experts.17.up_proj.weight`` -> True; attention, norms, router, shared
    experts, embeddings -> False."""
    return _EXPERT.search(hf_name) is not None


def dtype_name(dtype: torch.dtype) -> str:
    """The spelling SGLang resolves with ``getattr(torch, name)``: ``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class WeightSpec(TensorSpec):
    """One HF tensor a stage sends: the safetensors writer's spec (name, full shape, dtype,
    nbytes), plus whether it belongs to the expert pass."""

    @property
    def is_expert(self) -> bool:
        return is_expert_name(self.name)


def plan_buckets(specs: Sequence[WeightSpec], bucket_bytes: int) -> list[list[WeightSpec]]:
    """Group ``specs`` into buckets of at most ``bucket_bytes`` (one oversized tensor alone):
    every non-expert bucket before every expert bucket, stream order kept within each pass, every
    tensor at an offset aligned to its element size."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes={bucket_bytes}; it must be >= 1")
    buckets: list[list[WeightSpec]] = []
    for experts in (False, True):
        current: list[WeightSpec] = []
        size = 0
        for spec in specs:
            if spec.is_expert != experts:
                continue
            if current and (size + spec.nbytes > bucket_bytes or size % spec.dtype.itemsize):
                buckets.append(current)
                current, size = [], 0
            current.append(spec)
            size += spec.nbytes
        if current:
            buckets.append(current)
    return buckets


def bucket_offsets(specs: Sequence[WeightSpec]) -> list[tuple[int, int]]:
    """(start, end) byte range of each tensor in the bucket's flat buffer."""
    out, start = [], 0
    for spec in specs:
        out.append((start, start + spec.nbytes))
        start += spec.nbytes
    return out


def bucket_nbytes(specs: Sequence[WeightSpec]) -> int:
    return sum(spec.nbytes for spec in specs)


def write_into_bucket(buffer: torch.Tensor, start: int, spec: WeightSpec, tensor: torch.Tensor) -> None:
    """Copy ``tensor`` (which must match ``spec``) into ``buffer[start : start + nbytes]``."""
    if tensor.dtype != spec.dtype or tuple(tensor.shape) != tuple(spec.shape):
        raise ValueError(f"tensor for {spec.name} is {tensor.dtype} {tuple(tensor.shape)}, the bucket "
                         f"plan expects {spec.dtype} {tuple(spec.shape)}")
    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    buffer[start:start + spec.nbytes].copy_(raw)


def flatten_bucket(specs: Sequence[WeightSpec], tensors: Iterable[torch.Tensor], *,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """The bucket's ``uint8 [bucket_nbytes]`` buffer (SGLang's flattened_bucket layout)."""
    tensors = list(tensors)
    if len(tensors) != len(specs):
        raise ValueError(f"{len(tensors)} tensors for a bucket of {len(specs)}")
    if device is None:
        device = tensors[0].device if tensors else torch.device("cpu")
    buffer = torch.empty(bucket_nbytes(specs), dtype=torch.uint8, device=device)
    for spec, (start, _), tensor in zip(specs, bucket_offsets(specs), tensors):
        write_into_bucket(buffer, start, spec, tensor)
    return buffer


def unflatten_bucket(buffer: torch.Tensor, specs: Sequence[WeightSpec]) -> list[torch.Tensor]:
    """Inverse of :func:`flatten_bucket`: views of ``buffer`` with each spec's dtype and shape."""
    if buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() != bucket_nbytes(specs):
        raise ValueError(f"a bucket buffer is uint8 [{bucket_nbytes(specs)}], got {buffer.dtype} "
                         f"{tuple(buffer.shape)}")
    return [buffer[start:end].view(spec.dtype).reshape(spec.shape)
            for spec, (start, end) in zip(specs, bucket_offsets(specs))]
