"""Streaming writer for sharded safetensors: each shard is written as its tensors arrive.

The full list of output tensors (name, shape, dtype) is known before any data exists (it follows
from the HF config), so the writer plans every shard — its tensors, their byte offsets, its header —
up front. A shard's file is opened and its header written when its first tensor arrives; each
tensor's bytes are appended as it arrives and then dropped (or copied file-to-file inside the kernel
with ``copy_from`` when they already exist as raw bytes elsewhere); the file is fsync'ed and closed
when its last tensor arrives (so the completion marker, written after, never vouches for unwritten
data). Memory is therefore one tensor, never one shard, and there is no second pass.

File format (https://github.com/huggingface/safetensors): 8-byte little-endian header length, a
JSON header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``
padded with spaces to a multiple of 8, then the raw little-endian bytes with no holes.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

import torch

from gmpo_megatron.convert.errors import ConversionError
from gmpo_megatron.convert.hf_io import DTYPE_NAMES, INDEX_FILE, SINGLE_FILE
from gmpo_megatron.convert.raw_io import DurableWriter, copy_range, tensor_bytes, write_all

DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3  # the size transformers uses for published checkpoints


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"500MiB"`` -> 524_288_000, ``123`` -> 123."""
    if isinstance(text, int):
        return text
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * factor)
    return int(upper)


@dataclass
class _Shard:
    filename: str
    specs: list[TensorSpec]
    header: bytes = b""


class ShardedSafetensorsWriter:
    """Write ``specs`` (in that order) into ``directory`` as HF-style safetensors shards.

    ``write(name, tensor)`` must be called once per spec, in spec order, with exactly the planned
    shape and dtype (anything else is a converter bug and raises). ``finish()`` checks that every
    tensor arrived and writes ``model.safetensors.index.json`` when there is more than one shard.
    """

    def __init__(self, directory: str, specs: list[TensorSpec],
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ConversionError("duplicate output tensor names in the export plan")
        self.directory = directory
        self.shards = _plan_shards(specs, max_shard_bytes)
        self._order = [(i, spec) for i, shard in enumerate(self.shards) for spec in shard.specs]
        self._next = 0
        self._handle = None
        self._durable: DurableWriter | None = None
        self.bytes_written = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` (the next planned tensor, exact shape and dtype)."""
        spec = self._next_spec(name, tuple(tensor.shape), tensor.dtype)
        if spec.nbytes:
            write_all(self._handle.fileno(), tensor_bytes(tensor))
        self._advance(spec)

    def copy_from(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, path: str,
                  offset: int, nbytes: int) -> None:
        """Append the next planned tensor by copying ``nbytes`` raw bytes at ``offset`` of file
        ``path`` (the tensor's exact little-endian bytes), inside the kernel when it can."""
        spec = self._next_spec(name, tuple(shape), dtype)
        if nbytes != spec.nbytes:
            raise ConversionError(f"{name}: {nbytes} source bytes for a {spec.nbytes}-byte tensor")
        with open(path, "rb", buffering=0) as source:
            copy_range(source.fileno(), self._handle.fileno(), offset, nbytes)
        self._advance(spec)

    def _next_spec(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> TensorSpec:
        if self._next >= len(self._order):
            raise ConversionError(f"export produced an unplanned extra tensor {name}")
        shard_index, spec = self._order[self._next]
        if name != spec.name or shape != spec.shape or dtype != spec.dtype:
            raise ConversionError(
                f"export produced {name} {shape} {dtype}, but the plan expected "
                f"{spec.name} {spec.shape} {spec.dtype} next"
            )
        if self._handle is None:
            shard = self.shards[shard_index]
            self._handle = open(os.path.join(self.directory, shard.filename), "wb", buffering=0)
            self._durable = DurableWriter(self._handle.fileno())
            write_all(self._handle.fileno(), memoryview(shard.header))
        return spec

    def _advance(self, spec: TensorSpec) -> None:
        shard_index = self._order[self._next][0]
        self.bytes_written += spec.nbytes
        self._durable.wrote(spec.nbytes)
        self._next += 1
        if self._next == len(self._order) or self._order[self._next][0] != shard_index:
            self._durable.finish()  # durable before the completion marker is written
            self.close()

    def finish(self) -> list[str]:
        if self._next != len(self._order):
            missing = [spec.name for _, spec in self._order[self._next:]]
            raise ConversionError(f"export ended before writing {len(missing)} planned tensors, "
                                  f"first: {missing[0]}")
        if len(self.shards) > 1:
            weight_map = {spec.name: shard.filename for shard in self.shards for spec in shard.specs}
            index = {"metadata": {"total_size": sum(s.nbytes for _, s in self._order)},
                     "weight_map": dict(sorted(weight_map.items()))}
            with open(os.path.join(self.directory, INDEX_FILE), "w") as f:
                json.dump(index, f, indent=2)
                f.write("\n")
        return [shard.filename for shard in self.shards]

    def close(self) -> None:
        if self._handle is not None:
            self._durable.wait()
            self._handle.close()
            self._handle = None


def _plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[_Shard]:
    """Greedy packing in production order (transformers' rule: a tensor larger than the limit
    gets a shard of its own)."""
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if groups[-1] and size + spec.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    total = len(groups)
    shards = []
    for i, group in enumerate(groups):
        filename = SINGLE_FILE if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        shards.append(_Shard(filename, group, _header(group)))
    return shards


def _header(specs: list[TensorSpec]) -> bytes:
    entries: dict[str, dict] = {}
    offset = 0
    for spec in specs:
        entries[spec.name] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                              "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    header = {"__metadata__": {"format": "pt"}, **dict(sorted(entries.items()))}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw
