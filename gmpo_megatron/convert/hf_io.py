"""Read Hugging Face safetensors checkpoints lazily, one tensor at a time.

Public API (the trainer reuses it to load an initial checkpoint straight from an HF directory)::

    from gmpo_megatron.convert.hf_io import open_hf_checkpoint
    from gmpo_megatron.megatron.weights import load_hf_weights

    with open_hf_checkpoint(hf_dir) as ckpt:       # reads only the file headers
        load_hf_weights(model, get_mapping(hf_config), ckpt.read)   # each rank reads what it needs

``HFCheckpoint.keys()`` are *per-expert* HF names whatever the file layout, so they match
``QwenMapping.hf_names()``. Layouts handled:

- one ``model.safetensors`` file, or shards listed by ``model.safetensors.index.json``;
- per-expert tensors ``model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight`` (the published Qwen
  layout, and what transformers 5 ``save_pretrained`` writes);
- the transformers-5 *in-memory* fused layout that appears when a state dict is saved directly:
  ``model.layers.N.mlp.experts.gate_up_proj`` ``[E, 2*I, H]`` (rows ``[:I]`` gate, ``[I:]`` up, as in
  ``Qwen3MoeExperts.forward``: ``linear(x, gate_up_proj[e]).chunk(2, -1)``) and
  ``model.layers.N.mlp.experts.down_proj`` ``[E, H, I]``. Expert ``e`` is a contiguous byte range of
  the fused tensor, so reading one expert reads only its bytes.

Reads go straight from the file into a fresh tensor (``readinto``; no mmap, no second copy), after
checking that every header entry's byte range matches its dtype and shape.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass

import torch

from gmpo_megatron.convert.errors import ConversionError
from gmpo_megatron.convert.raw_io import FileRange

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}

_FUSED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


@dataclass(frozen=True)
class TensorLocation:
    """Where one logical (per-expert) HF tensor's bytes are."""

    file: str  # absolute path
    key: str  # the key in that file's header
    start: int  # absolute byte offset in the file
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_safetensors_header(path: str) -> tuple[dict, int]:
    """(header dict without ``__metadata__``, absolute offset of the data section)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ConversionError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise ConversionError(f"{path}: header length {header_len} exceeds the file size {size}")
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    for key, entry in header.items():
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise ConversionError(f"{path}: tensor {key} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        expected = math.prod(entry["shape"]) * dtype.itemsize
        if end - begin != expected or data_start + end > size or begin < 0:
            raise ConversionError(
                f"{path}: tensor {key} ({entry['dtype']} {entry['shape']}) has byte range "
                f"[{begin}, {end}) that does not match its shape or the file size {size}: the file "
                "is truncated or corrupt"
            )
    return header, data_start


def read_into(handle, start: int, out: torch.Tensor) -> torch.Tensor:
    """Fill the contiguous tensor ``out`` with the bytes at ``start`` of the open binary file."""
    nbytes = out.numel() * out.element_size()
    if nbytes == 0:
        return out
    handle.seek(start)
    view = memoryview(out.view(torch.uint8).reshape(-1).numpy())
    got = 0
    while got < nbytes:  # readinto may return short counts on some filesystems
        n = handle.readinto(view[got:])
        if not n:
            raise ConversionError(f"{handle.name}: unexpected end of file at byte {start + got}")
        got += n
    return out


class HFCheckpoint:
    """A lazily read HF safetensors checkpoint directory (see the module docstring).

    ``keys()`` lists logical per-expert names; ``read(name)`` returns a new, contiguous tensor;
    ``shape(name)`` / ``dtype(name)`` come from the headers without reading data. Use it as a
    context manager (or call ``close()``) to release the file handles.
    """

    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(directory)
        self.files = _checkpoint_files(self.directory)
        self.fused_layout = False
        self._locations: dict[str, TensorLocation] = {}
        self._handles: dict[str, object] = {}
        index_map = _index_weight_map(self.directory)
        for path in self.files:
            header, data_start = read_safetensors_header(path)
            for key, entry in header.items():
                if index_map is not None:
                    listed = index_map.get(key)
                    if listed != os.path.basename(path):
                        raise ConversionError(
                            f"tensor {key} is in {os.path.basename(path)} but {INDEX_FILE} "
                            f"{'lists it in ' + listed if listed else 'does not list it'}: the index "
                            "and the shards disagree (a partial copy or an edited checkpoint)"
                        )
                dtype = SAFETENSORS_DTYPES[entry["dtype"]]
                location = TensorLocation(path, key, data_start + entry["data_offsets"][0],
                                          tuple(entry["shape"]), dtype)
                match = _FUSED.match(key)
                if match:
                    self.fused_layout = True
                    self._add_fused(match.group(1), match.group(2), location)
                else:
                    self._add(key, location)
        if index_map is not None:
            present = {loc.key for loc in self._locations.values()}
            for key, file in index_map.items():
                if key not in present:
                    raise ConversionError(
                        f"{INDEX_FILE} lists tensor {key} in {file}, but that file does not contain it"
                    )

    # -- building the name table ----------------------------------------------------------
    def _add(self, name: str, location: TensorLocation) -> None:
        if name in self._locations:
            other = self._locations[name]
            raise ConversionError(
                f"tensor {name} appears twice (in {os.path.basename(other.file)} as {other.key} and "
                f"in {os.path.basename(location.file)} as {location.key}): refusing to guess which "
                "one is meant"
            )
        self._locations[name] = location

    def _add_fused(self, prefix: str, kind: str, loc: TensorLocation) -> None:
        if len(loc.shape) != 3:
            raise ConversionError(
                f"fused expert tensor {loc.key} has shape {loc.shape}; expected 3 dims "
                "[experts, out, in] (transformers-5 layout)"
            )
        experts, rows, cols = loc.shape
        per_expert = rows * cols * loc.dtype.itemsize
        if kind == "down_proj":
            for e in range(experts):
                self._add(f"{prefix}.{e}.down_proj.weight",
                          TensorLocation(loc.file, loc.key, loc.start + e * per_expert, (rows, cols),
                                         loc.dtype))
            return
        if rows % 2:
            raise ConversionError(
                f"fused expert tensor {loc.key} has shape {loc.shape}: dim 1 must be 2 * "
                "moe_intermediate_size ([gate; up] rows, transformers-5 layout [E, 2I, H])"
            )
        half = rows // 2
        for e in range(experts):
            base = loc.start + e * per_expert
            self._add(f"{prefix}.{e}.gate_proj.weight",
                      TensorLocation(loc.file, loc.key, base, (half, cols), loc.dtype))
            self._add(f"{prefix}.{e}.up_proj.weight",
                      TensorLocation(loc.file, loc.key, base + per_expert // 2, (half, cols),
                                     loc.dtype))

    # -- the API --------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._locations)

    def __contains__(self, name: str) -> bool:
        return name in self._locations

    def location(self, name: str) -> TensorLocation:
        try:
            return self._locations[name]
        except KeyError:
            raise ConversionError(
                f"HF tensor {name} is missing from the checkpoint in {self.directory}"
            ) from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.location(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self.location(name).dtype

    def total_bytes(self) -> int:
        return sum(loc.nbytes for loc in self._locations.values())

    def read(self, name: str) -> torch.Tensor:
        """The full tensor ``name`` (per-expert name even for fused files), freshly allocated."""
        loc = self.location(name)
        return read_into(self._handle(loc.file), loc.start, torch.empty(loc.shape, dtype=loc.dtype))

    def byte_range(self, name: str, first: int = 0, count: int | None = None) -> FileRange:
        """Where rows ``[first, first + count)`` (dim 0; all rows when ``count`` is None) of
        tensor ``name`` are stored: one contiguous range of its file."""
        loc = self.location(name)
        if not loc.shape:
            raise ConversionError(f"HF tensor {name} is a scalar: it has no rows")
        count = loc.shape[0] - first if count is None else count
        if first < 0 or count < 0 or first + count > loc.shape[0]:
            raise ConversionError(f"rows [{first}, {first + count}) are outside HF tensor {name} "
                                  f"of shape {loc.shape}")
        row_bytes = loc.nbytes // loc.shape[0] if loc.shape[0] else 0
        return FileRange(loc.file, loc.start + first * row_bytes, count * row_bytes)

    def read_rows(self, name: str, first: int, out: torch.Tensor) -> torch.Tensor:
        """Fill the contiguous ``out`` (``[count, *shape[1:]]``, the tensor's dtype) with rows
        ``[first, first + count)`` of tensor ``name``."""
        loc = self.location(name)
        if out.dtype != loc.dtype or tuple(out.shape[1:]) != loc.shape[1:]:
            raise ConversionError(f"cannot read rows of HF tensor {name} ({loc.dtype}, "
                                  f"{loc.shape}) into a {out.dtype} {tuple(out.shape)} buffer")
        where = self.byte_range(name, first, out.shape[0])
        return read_into(self._handle(loc.file), where.offset, out)

    def _handle(self, path: str):
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = open(path, "rb", buffering=0)
        return handle

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __enter__(self) -> HFCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def open_hf_checkpoint(directory: str) -> HFCheckpoint:
    """Open the safetensors checkpoint in ``directory`` (reads only the file headers)."""
    return HFCheckpoint(directory)


def _index_weight_map(directory: str) -> dict[str, str] | None:
    path = os.path.join(directory, INDEX_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        index = json.load(f)
    if "weight_map" not in index:
        raise ConversionError(f"{path} has no 'weight_map'")
    return index["weight_map"]


def _checkpoint_files(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        raise ConversionError(f"HF checkpoint directory {directory} does not exist")
    weight_map = _index_weight_map(directory)
    if weight_map is not None:
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
        if missing:
            raise ConversionError(
                f"{INDEX_FILE} in {directory} names shard(s) that do not exist: {missing[:5]}"
            )
        return [os.path.join(directory, f) for f in files]
    found = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if found == [SINGLE_FILE] or len(found) == 1:
        return [os.path.join(directory, found[0])]
    if not found:
        others = sorted(f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth")))
        hint = (f" (found {others[:3]}: re-save with save_pretrained(safe_serialization=True))"
                if others else "")
        raise ConversionError(f"no .safetensors files in {directory}{hint}")
    raise ConversionError(
        f"{directory} has {len(found)} .safetensors files but no {INDEX_FILE}: cannot tell which "
        "belong to the checkpoint; restore the index file"
    )
