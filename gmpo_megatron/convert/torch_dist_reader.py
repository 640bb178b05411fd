"""Read full Megatron tensors from a ``torch_dist`` dist_checkpointing checkpoint, tensor by tensor.

Megatron-Core's torch_dist format is PyTorch Distributed Checkpoint (DCP) underneath: a ``.metadata``
pickle lists, for every sharded key, its *global* (unsharded) shape, dtype and the chunks each rank
wrote, and the ``__R_T.distcp`` files hold the chunks. The global tensor is independent of the
TP / PP / EP / ETP layout it was saved at (Megatron stores the fc1 ``[gate; up]`` halves as separate
chunks of one global ``[2I, H]`` tensor, experts along a leading global-expert axis, ...), so
reading a region of the global tensor is a layout-independent read. This module asks DCP's own
resharding planner (``create_read_items_for_chunk_list``) which stored byte ranges cover the region
and lets DCP's ``FileSystemReader.read_data`` copy exactly those bytes — no model is built and
nothing is cast, so the result is bit-identical to what was saved.

Key layouts understood (all produced by megatron-core 0.16 for the GPT model):

- ``embedding.word_embeddings.weight``, ``output_layer.weight``, ``decoder.final_layernorm.weight``;
- per-layer keys ``decoder.layers.{L}.<rest>`` (heterogeneous blocks, e.g. every MoE model built
  with a ``moe_layer_freq`` list) and stacked keys ``decoder.layers.<rest>`` with a leading global
  layer axis (homogeneous dense blocks);
- expert keys ``...mlp.experts.experts.linear_fc{1,2}.weight`` with a leading global expert axis
  (SequentialMLP and TE GroupedMLP share them), or ``...mlp.experts.experts.{E}.linear_fc..``
  (``singleton_local_shards``);
- with ``singleton_local_shards`` the fc1 halves are separate keys ``<fc1>.weight_w`` (gate) and
  ``<fc1>.weight_v`` (up); they are concatenated back into ``[gate; up]``;
- Transformer-Engine norm names (``linear_qkv.layer_norm_weight``) are translated by
  ``gmpo_megatron.models.canonical_name``.

Keys outside ``embedding.`` / ``decoder.`` / ``output_layer.`` (optimizer state, RNG state, ...)
are ignored and listed in ``ignored_keys``; ``_extra_state`` byte entries are skipped.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import torch

from gmpo_megatron.convert.errors import ConversionError
from gmpo_megatron.convert.hf_io import read_into
from gmpo_megatron.models import canonical_name

_MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")
_PER_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_STACKED = re.compile(r"^decoder\.layers\.(?!\d+\.)(.+)$")
_FC = r"linear_fc[12]\.(?:weight|bias)(?:_[wv])?"
_EXPERTS_STACKED = re.compile(rf"^(.*)mlp\.experts\.experts\.({_FC})$")
_EXPERT_SINGLE = re.compile(rf"^(.*)mlp\.experts\.experts\.(\d+)\.({_FC})$")
_GLU_HALF = re.compile(r"^(.*linear_fc1\.weight)_([wv])$")
_VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")


@dataclass(frozen=True)
class StoredPart:
    """A region ``global[index...]`` of one stored key (leading layer / expert axes fixed)."""

    fqn: str
    index: tuple[int, ...]
    shape: tuple[int, ...]


@dataclass(frozen=True)
class StoredTensor:
    """One canonical tensor: its stored parts, concatenated along dim 0 (one part, or the gate
    and up halves of a singleton-sharded fc1)."""

    parts: tuple[StoredPart, ...]
    shape: tuple[int, ...]  # the canonical tensor's shape (vocab padding already trimmed)
    dtype: torch.dtype
    stored_rows: int | None = None  # rows in the checkpoint when padded (vocab), else None

    @property
    def fqn(self) -> str:
        return self.parts[0].fqn

    @property
    def index(self) -> tuple[int, ...]:
        return self.parts[0].index

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class _Planner:
    """The two LoadPlanner callbacks ``FileSystemReader.read_data`` uses: where to put a chunk."""

    def __init__(self, targets: dict[tuple[str, tuple[int, ...]], torch.Tensor]) -> None:
        self.targets = targets

    def resolve_tensor(self, read_item) -> torch.Tensor:
        target = self.targets[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            target = target.narrow(dim, start, length)
        return target

    def commit_tensor(self, read_item, tensor) -> None:
        pass

    def load_bytes(self, read_item, value) -> None:  # pragma: no cover - we request tensors only
        raise AssertionError("unexpected byte read")


class TorchDistCheckpoint:
    """Canonical-name view of a torch_dist checkpoint directory.

    ``shapes()`` maps canonical names (``decoder.layers.3.mlp.experts.local_experts.5.linear_fc1.weight``)
    to full shapes; ``read(names)`` returns full tensors for a batch of names in one pass over the
    files. ``vocab_size`` trims padded embedding / output rows (the padding is never read).
    """

    def __init__(self, directory: str, vocab_size: int | None = None) -> None:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        from gmpo_megatron.megatron import safe_load

        self.directory = os.path.abspath(directory)
        _check_torch_dist(self.directory)
        safe_load.install()  # .metadata is unpickled with restricted globals
        self._reader = FileSystemReader(self.directory)
        try:
            self.metadata = self._reader.read_metadata()
        except (safe_load.UnsafeCheckpointError, ValueError) as error:
            raise ConversionError(str(error)) from None
        self._reader.set_up_storage_reader(self.metadata, is_coordinator=True)
        self.tensors: dict[str, StoredTensor] = {}
        self.ignored_keys: list[str] = []
        self.direct_reads = self.dcp_reads = 0  # chunks read by _read_direct / by DCP's reader
        halves: dict[str, dict[str, tuple[StoredPart, torch.dtype]]] = {}
        for fqn, md in self.metadata.state_dict_metadata.items():
            if not isinstance(md, TensorStorageMetadata):
                continue  # _extra_state and other pickled objects
            if not fqn.startswith(_MODEL_PREFIXES):
                self.ignored_keys.append(fqn)
                continue
            for name, part in _expand(fqn, tuple(md.size)):
                glu_half = _GLU_HALF.match(name)
                if glu_half:
                    halves.setdefault(glu_half.group(1), {})[glu_half.group(2)] = (
                        part, md.properties.dtype)
                    continue
                stored = StoredTensor((part,), part.shape, md.properties.dtype)
                if vocab_size is not None and name in _VOCAB_ROWS and part.shape[0] > vocab_size:
                    stored = StoredTensor((part,), (vocab_size, *part.shape[1:]), stored.dtype,
                                          stored_rows=part.shape[0])
                self._add(name, stored)
        for name, pair in halves.items():
            if set(pair) != {"w", "v"} or pair["w"][1] != pair["v"][1]:
                raise ConversionError(f"{self.directory}: {name} has fc1 halves {sorted(pair)} "
                                      "(expected both _w and _v with one dtype)")
            (gate, dtype), (up, _) = pair["w"], pair["v"]
            self._add(name, StoredTensor((gate, up), (gate.shape[0] + up.shape[0], *gate.shape[1:]),
                                         dtype))

    def _add(self, name: str, stored: StoredTensor) -> None:
        if name in self.tensors:
            raise ConversionError(f"{self.directory}: tensor {name} is stored twice "
                                  f"({self.tensors[name].fqn} and {stored.fqn})")
        self.tensors[name] = stored

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: t.shape for name, t in self.tensors.items()}

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Full tensors for ``names`` (canonical), read in one pass; exact stored bytes and dtype."""
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        targets: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
        out: dict[str, torch.Tensor] = {}
        items = []
        for name in names:
            stored = self.tensors.get(name)
            if stored is None:
                raise ConversionError(f"tensor {name} is missing from the Megatron checkpoint in "
                                      f"{self.directory}")
            result = torch.empty(stored.shape, dtype=stored.dtype)
            row = 0
            for part in stored.parts:
                rows = min(part.shape[0], stored.shape[0] - row)  # vocab padding is not read
                shape = (rows, *part.shape[1:])
                lead = len(part.index)
                offsets = torch.Size(part.index + (0,) * len(shape))
                sizes = torch.Size((1,) * lead + shape)
                target = result.narrow(0, row, rows).view(sizes)
                targets[(part.fqn, tuple(offsets))] = target
                request = create_read_items_for_chunk_list(
                    part.fqn, self.metadata.state_dict_metadata[part.fqn],
                    [ChunkStorageMetadata(offsets=offsets, sizes=sizes)])
                covered = sum(math.prod(item.lengths) for item in request)
                if covered != target.numel():
                    raise ConversionError(
                        f"{self.directory}: the stored chunks of {part.fqn} cover {covered} of "
                        f"the {target.numel()} elements of {name}: the checkpoint is incomplete "
                        "(a rank's shard was never written)"
                    )
                items.extend(request)
                row += rows
            out[name] = result
        slow = [item for item in items if not self._read_direct(item, targets)]
        self.direct_reads += len(items) - len(slow)
        self.dcp_reads += len(slow)
        if slow:
            self._reader.read_data(LoadPlan(slow), _Planner(targets)).wait()
        return out

    def _read_direct(self, item, targets) -> bool:
        """Read one stored chunk straight into its destination, if it is the plain case.

        DCP stores each chunk as a small ``torch.save`` zip archive; ``read_data`` would
        ``torch.load`` it (allocate + read) and then copy it into our buffer. When the request is a
        whole stored chunk and the destination is contiguous, the archive's raw data record (see
        ``_raw_data_offset``) is read with one ``readinto`` into the destination instead: same
        bytes, no intermediate tensor. Anything else takes DCP's path."""
        info = self._reader.storage_data[item.storage_index]
        chunk = self.metadata.state_dict_metadata[item.storage_index.fqn].chunks[
            item.storage_index.index]
        target = _Planner(targets).resolve_tensor(item)
        if (any(item.storage_offsets) or tuple(item.lengths) != tuple(chunk.sizes)
                or not target.is_contiguous()):
            return False
        offset = self._raw_data_offset(info, tuple(target.shape), target.dtype)
        if offset is None:
            return False
        read_into(self._handle(info.relative_path), offset, target)
        return True

    def _raw_data_offset(self, info, shape: tuple[int, ...], dtype: torch.dtype) -> int | None:
        """Absolute file offset of a stored chunk's raw bytes, when its archive holds exactly one
        contiguous tensor of ``shape`` / ``dtype`` with nothing else in its storage (always so for
        chunks Megatron or our writer saved); None for anything else."""
        from torch.distributed.checkpoint.filesystem import _create_file_view

        if info.transform_descriptors:
            return None
        handle = self._handle(info.relative_path)
        try:
            view = _create_file_view(handle, info.offset, info.length)
            archive = torch._C.PyTorchFileReader(view)
            records = [r for r in archive.get_all_records() if r.startswith("data/")]
            if records != ["data/0"]:
                return None
            record_offset = archive.get_record_offset("data/0")
            view.seek(0)
            with torch.serialization.skip_data():
                stored = torch.load(view, weights_only=True)
        except Exception:
            return None
        nbytes = math.prod(shape) * dtype.itemsize
        if (not isinstance(stored, torch.Tensor) or stored.dtype != dtype
                or tuple(stored.shape) != tuple(shape) or not stored.is_contiguous()
                or stored.storage_offset() != 0 or stored.untyped_storage().nbytes() != nbytes):
            return None
        return info.offset + record_offset

    def byte_ranges(self, name: str) -> list[tuple[str, int, int]] | None:
        """Where the bytes of canonical tensor ``name`` lie, as ``(file, offset, nbytes)`` pieces
        in row order — when it is tiled along dim 0 by whole stored chunks held as raw bytes (a
        checkpoint saved at TP1/ETP1: fc1 is two chunks, gate rows then up rows). Vocab padding
        rows are left out. None otherwise."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        stored = self.tensors[name]
        itemsize = stored.dtype.itemsize
        ranges, row = [], 0
        for part in stored.parts:
            lead = len(part.index)
            row_bytes = math.prod(part.shape[1:]) * itemsize
            tiles = sorted(
                (c for c in self.metadata.state_dict_metadata[part.fqn].chunks
                 if tuple(c.offsets[:lead]) == part.index and all(n == 1 for n in c.sizes[:lead])),
                key=lambda c: c.offsets[lead])
            expected_row = 0
            for chunk in tiles:
                rows_here = chunk.sizes[lead]
                if (chunk.offsets[lead] != expected_row or any(chunk.offsets[lead + 1:])
                        or tuple(chunk.sizes[lead + 1:]) != part.shape[1:]):
                    return None
                info = self._reader.storage_data.get(MetadataIndex(part.fqn, chunk.offsets))
                offset = None if info is None else self._raw_data_offset(
                    info, tuple(chunk.sizes), stored.dtype)
                if offset is None:
                    return None
                wanted = min(rows_here, stored.shape[0] - row)
                if wanted > 0:
                    ranges.append((os.path.join(self.directory, info.relative_path), offset,
                                   wanted * row_bytes))
                    row += wanted
                expected_row += rows_here
            if expected_row != part.shape[0]:
                return None
        return ranges if row == stored.shape[0] else None

    def _handle(self, relative_path: str):
        handles = self.__dict__.setdefault("_handles", {})
        if relative_path not in handles:
            handles[relative_path] = open(os.path.join(self.directory, relative_path), "rb",
                                          buffering=0)
        return handles[relative_path]

    def close(self) -> None:
        for handle in self.__dict__.pop("_handles", {}).values():
            handle.close()


def _expand(fqn: str, size: tuple[int, ...]):
    """(canonical name, StoredPart) for every canonical tensor inside the stored key ``fqn``."""
    per_layer = _PER_LAYER.match(fqn)
    stacked = None if per_layer else _STACKED.match(fqn)
    if not per_layer and not stacked:
        yield canonical_name(fqn) or fqn, StoredPart(fqn, (), size)
        return
    if per_layer:
        layers: list[tuple[tuple[int, ...], int]] = [((), int(per_layer.group(1)))]
        rest, dims = per_layer.group(2), size
    else:
        layers = [((layer,), layer) for layer in range(size[0])]
        rest, dims = stacked.group(1), size[1:]
    single = _EXPERT_SINGLE.match(rest)
    many = None if single else _EXPERTS_STACKED.match(rest)
    for lead, layer in layers:
        if single:
            expert = int(single.group(2))
            local = f"{single.group(1)}mlp.experts.local_experts.{expert}.{single.group(3)}"
            yield (canonical_name(f"decoder.layers.{layer}.{local}"),
                   StoredPart(fqn, lead, tuple(dims)))
        elif many:
            for expert in range(dims[0]):
                local = f"{many.group(1)}mlp.experts.local_experts.{expert}.{many.group(2)}"
                yield (canonical_name(f"decoder.layers.{layer}.{local}"),
                       StoredPart(fqn, lead + (expert,), tuple(dims[1:])))
        else:
            yield (canonical_name(f"decoder.layers.{layer}.{rest}"),
                   StoredPart(fqn, lead, tuple(dims)))


def _check_torch_dist(directory: str) -> None:
    if not os.path.isdir(directory):
        raise ConversionError(f"Megatron checkpoint directory {directory} does not exist")
    meta_path = os.path.join(directory, "metadata.json")
    if not os.path.isfile(meta_path) or not os.path.isfile(os.path.join(directory, ".metadata")):
        hint = ""
        subdirs = sorted(d for d in os.listdir(directory) if d.startswith("iter_"))
        if subdirs:
            hint = f" (it has {subdirs[-1]}/: pass that directory)"
        raise ConversionError(
            f"{directory} is not a dist_checkpointing checkpoint: metadata.json or .metadata is "
            f"missing{hint}"
        )
    with open(meta_path) as f:
        backend = json.load(f).get("sharded_backend")
    if backend != "torch_dist":
        raise ConversionError(f"{directory}: sharded backend {backend!r} is not supported; only "
                              "'torch_dist' (the dist_checkpointing default) is")
