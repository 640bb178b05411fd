"""Write a Megatron ``torch_dist`` checkpoint straight from HF files, without holding the model.

The checkpoint's *structure* comes from Megatron itself: the model is built on the ``meta`` device
(no memory) at TP1/PP1/EP1 and its ``sharded_state_dict()`` goes through the normal
``dist_checkpointing.save`` path (preprocessing, validation, ``common.pt``, ``metadata.json``) and
Megatron's own DCP planner (``MCoreSavePlanner``), so keys, global shapes, chunking and the
``.metadata`` file are the ones Megatron writes for that model. Only the *data* differs in origin:
when the file writer asks the planner for a chunk (one at a time, in plan order), the planner
answers from the HF files, transformed by the mapping and cast to the parameter dtype — the values
a model filled by ``load_hf_weights`` would hold:

- a chunk made of whole rows of HF tensors in its stored dtype (every chunk of a bf16 checkpoint
  converted to bf16: identity, fc1 ``[gate; up]``, the per-group QKV interleave) is a list of byte
  ranges of the HF files, which ``DirectFileWriter`` copies file-to-file inside the kernel;
- any other chunk (a dtype cast) is read into one tensor, row range by row range, and cast.

Memory is one chunk at most instead of the whole model, there is no staging clone and no writer
process, and the result reloads at any layout like any other dist_checkpointing checkpoint (tests
compare it with a model-based save, byte for byte with PyTorch's own writer, and load it at TP2 /
PP2 / EP2 / TP2+EP2).

One process only; under torchrun the model-based path is used (each rank holds its shard).
"""

from __future__ import annotations

import re
import warnings

import torch

from gmpo_megatron.convert import dcp_file_writer
from gmpo_megatron.convert.dcp_file_writer import DirectFileWriter
from gmpo_megatron.convert.errors import ConversionError
from gmpo_megatron.convert.raw_io import FileRange
from gmpo_megatron.convert.torch_dist_reader import _GLU_HALF, _expand
from gmpo_megatron.models.base import QwenMapping

_INDICES = re.compile(r"(?<=\.)\d+(?=\.)")  # layer and expert numbers


class HFChunkSource:
    """The data of one stored chunk (stored key, global offsets, sizes), taken from HF tensors.

    ``checkpoint`` is an ``HFCheckpoint`` (``location``, ``read``, ``read_rows``, ``byte_range``).
    The mapping is probed once per tensor with row-id tensors: when it only selects and reorders
    whole rows of its HF inputs (identity, the fc1 ``[gate; up]`` concatenation, the per-group QKV
    interleave), a chunk is a list of row ranges of HF tensors, i.e. of byte ranges of the HF files
    (``payload``), which the writer copies file-to-file, or reads straight into place when the
    dtype changes. A mapping that does anything else is applied to the full tensors (``__call__``).
    """

    def __init__(self, mapping: QwenMapping, checkpoint) -> None:
        self.mapping = mapping
        self.checkpoint = checkpoint
        self._hf_shapes = mapping.expected_hf_shapes()
        self.names_read: set[str] = set()
        self.chunks_served = 0
        self.bytes_by_range = 0
        self._parts: tuple[str | None, list] = (None, [])
        self._row_id_cache: dict[tuple, torch.Tensor | None] = {}

    def payload(self, fqn: str, global_size: tuple[int, ...], offsets: tuple[int, ...],
                sizes: tuple[int, ...], dtype: torch.dtype) -> list[FileRange] | torch.Tensor:
        """The chunk as byte ranges of the HF files when it is whole HF rows already in
        ``dtype``; otherwise as a tensor (``__call__``)."""
        pieces = self._pieces(fqn, global_size, offsets, sizes)
        if pieces is None or any(self.checkpoint.dtype(n) != dtype for n, _, _ in pieces):
            return self._tensor(pieces, fqn, global_size, offsets, sizes, dtype)
        self._served(pieces)
        ranges = [self.checkpoint.byte_range(name, first, count) for name, first, count in pieces]
        self.bytes_by_range += sum(r.nbytes for r in ranges)
        return ranges

    def __call__(self, fqn: str, global_size: tuple[int, ...], offsets: tuple[int, ...],
                 sizes: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The chunk as a new tensor of ``dtype`` and shape ``sizes``."""
        pieces = self._pieces(fqn, global_size, offsets, sizes)
        return self._tensor(pieces, fqn, global_size, offsets, sizes, dtype)

    def _tensor(self, pieces, fqn, global_size, offsets, sizes, dtype) -> torch.Tensor:
        """Read ``pieces`` (whole rows) into one tensor, or apply the mapping to the full HF
        tensors when there are none, and cast to ``dtype``."""
        if pieces is not None and len({self.checkpoint.dtype(n) for n, _, _ in pieces}) == 1:
            self._served(pieces)
            name = pieces[0][0]
            rows = sum(count for _, _, count in pieces)
            tensor = torch.empty((rows, *self._hf_shapes[name][1:]),
                                 dtype=self.checkpoint.dtype(name))
            position = 0
            for name, first, count in pieces:
                self.checkpoint.read_rows(name, first, tensor[position:position + count])
                position += count
            return tensor.to(dtype).reshape(sizes)
        name, lead = self._locate(fqn, global_size, offsets, sizes)
        region = tuple(zip(offsets[lead:], sizes[lead:]))
        group = self.mapping.group_of(name)
        self.names_read.update(group.hf_names)
        full = self.mapping.to_megatron(name, [self.checkpoint.read(h) for h in group.hf_names])
        tensor = full
        for dim, (start, length) in enumerate(region):
            tensor = tensor.narrow(dim, start, length)
        if tuple(tensor.shape) != tuple(length for _, length in region):
            raise ConversionError(f"{fqn}{list(offsets)}: HF data has shape "
                                  f"{tuple(full.shape)}, the checkpoint chunk {sizes[lead:]}")
        if tensor.shape != full.shape:
            tensor = tensor.clone()  # torch.save would otherwise write the whole storage
        self.chunks_served += 1
        return tensor.to(dtype).reshape(sizes)

    def _served(self, pieces) -> None:
        self.names_read.update(name for name, _, _ in pieces)
        self.chunks_served += 1

    def _pieces(self, fqn, global_size, offsets, sizes) -> list[tuple[str, int, int]] | None:
        """``[(hf_name, first_row, rows)]`` whose rows, concatenated, are the chunk; None when
        the mapping is not a row rearrangement or the chunk does not span whole rows."""
        name, lead = self._locate(fqn, global_size, offsets, sizes)
        region = tuple(zip(offsets[lead:], sizes[lead:]))
        group = self.mapping.group_of(name)
        row_ids = self._row_ids(name, group.hf_names)
        if row_ids is None or not region:
            return None
        (start, length), *rest = region
        trailing = self._hf_shapes[group.hf_names[0]][1:]
        if start + length > len(row_ids) or tuple(rest) != tuple((0, n) for n in trailing):
            return None  # __call__ builds the tensor and names the mismatch, if there is one
        ids = row_ids[start:start + length]
        counts = [self._hf_shapes[h][0] for h in group.hf_names]
        bounds = torch.tensor([0, *counts]).cumsum(0)
        which = torch.searchsorted(bounds, ids, right=True) - 1
        breaks = torch.ones(len(ids), dtype=torch.bool)
        breaks[1:] = (ids[1:] != ids[:-1] + 1) | (which[1:] != which[:-1])
        run_starts = breaks.nonzero().flatten().tolist() + [len(ids)]
        pieces = []
        for begin, end in zip(run_starts[:-1], run_starts[1:]):
            tensor_index = int(which[begin])
            pieces.append((group.hf_names[tensor_index], int(ids[begin] - bounds[tensor_index]),
                           end - begin))
        return pieces

    def _row_ids(self, name: str, hf_names: tuple[str, ...]) -> torch.Tensor | None:
        """For each row of the full Megatron tensor ``name``: the row's index in its HF tensors
        stacked in ``hf_names`` order, or None when the mapping is not a row rearrangement.

        Probe: each HF tensor becomes an int64 ``[rows, 2]`` tensor holding ``2 * id, 2 * id + 1``
        (1-D tensors: ``[rows]`` holding ``id``). A mapping that keeps rows whole keeps those pairs
        intact; the same mapping applied to ``meta`` tensors of the real shapes must give
        ``[rows_out, *trailing]``."""
        shapes = [self._hf_shapes[h] for h in hf_names]
        # QwenMapping.to_megatron depends on a tensor's kind (its name without layer and expert
        # numbers) and the shapes, so every expert of every layer shares one probe.
        key = (_INDICES.sub("#", name), tuple(shapes))
        if key not in self._row_id_cache:
            self._row_id_cache[key] = self._probe_row_ids(name, shapes)
        return self._row_id_cache[key]

    def _probe_row_ids(self, name: str, shapes: list[tuple[int, ...]]) -> torch.Tensor | None:
        trailing = shapes[0][1:] if shapes[0] else None
        if trailing is None or any(s[1:] != trailing or not s for s in shapes):
            return None
        probes, first = [], 0
        for shape in shapes:
            ids = torch.arange(first, first + shape[0])
            probes.append(torch.stack([2 * ids, 2 * ids + 1], dim=1) if trailing else ids)
            first += shape[0]
        try:
            out = self.mapping.to_megatron(name, probes)
            out_meta = self.mapping.to_megatron(
                name, [torch.empty(s, device="meta") for s in shapes])
        except (RuntimeError, ValueError):
            return None
        if tuple(out_meta.shape) != (out.shape[0], *trailing):
            return None
        if not trailing:
            return out if out.dim() == 1 else None
        if out.dim() != 2 or out.shape[1] != 2 or not torch.equal(out[:, 1], out[:, 0] + 1) \
                or bool((out[:, 0] % 2).any()):
            return None
        return out[:, 0] // 2

    def _locate(self, fqn: str, global_size, offsets, sizes) -> tuple[str, int]:
        if self._parts[0] != fqn:
            self._parts = (fqn, list(_expand(fqn, tuple(global_size))))
        for name, part in self._parts[1]:
            lead = len(part.index)
            if tuple(offsets[:lead]) == part.index and all(s == 1 for s in sizes[:lead]):
                if _GLU_HALF.match(name):
                    raise ConversionError(f"{fqn}: singleton fc1 halves are not written by the "
                                          "streaming writer")
                return name, lead
        raise ConversionError(f"no canonical tensor for {fqn} at {list(offsets)}")


def _streaming_strategy(source: HFChunkSource):
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint import save as dcp_save

    def chunk_args(write_item):
        meta = write_item.tensor_data
        return (write_item.index.fqn, tuple(meta.size), tuple(meta.chunk.offsets),
                tuple(meta.chunk.sizes), meta.properties.dtype)

    class StreamingPlanner(MCoreSavePlanner):
        def resolve_data(self, write_item):
            data = super().resolve_data(write_item)
            if isinstance(data, torch.Tensor) and data.is_meta:
                data = source(*chunk_args(write_item))
            return data

        def resolve_payload(self, write_item):
            """``DirectFileWriter``'s entry: byte ranges of the HF files when the chunk is made of
            whole HF rows in its stored dtype, else the tensor."""
            data = super().resolve_data(write_item)
            if isinstance(data, torch.Tensor) and data.is_meta:
                return source.payload(*chunk_args(write_item))
            return data

    class StreamingStrategy(TorchDistSaveShardedStrategy):
        """Megatron's torch_dist save, synchronous, with an in-process file writer."""

        def save(self, sharded_state_dict, checkpoint_dir):
            sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, self.keep_only_main_replica)
            pyt_state_dict = mcore_to_pyt_state_dict(sharded_state_dict, False)
            if dcp_file_writer.direct_records_match_torch_save():
                writer = DirectFileWriter(str(checkpoint_dir))
            else:
                warnings.warn("this torch's torch.save archives differ from the records "
                              "gmpo-convert's direct writer builds: writing with torch's "
                              "FileSystemWriter instead (the same checkpoint, slower)")
                writer = dcp_file_writer.torch_file_writer(str(checkpoint_dir))
            planner = StreamingPlanner(dedup_replicated_tensors=not self.keep_only_main_replica,
                                       flatten_state_dict=False)
            dcp_save(pyt_state_dict, storage_writer=writer, planner=planner)

    return StreamingStrategy("torch_dist", 1, thread_count=1)


def save_streaming(meta_model, source: HFChunkSource, directory: str) -> None:
    """Save ``meta_model``'s checkpoint into ``directory`` (empty) with data from ``source``."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    crc32 = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)  # see megatron_ckpt.save_megatron_model
    try:
        dist_checkpointing.save(meta_model.sharded_state_dict(), directory,
                                sharded_strategy=_streaming_strategy(source))
    except CheckpointException as error:  # DCP wraps what the planner or writer raised
        for failure, _ in error.failures.values():
            if isinstance(failure, ConversionError):
                raise failure from None
        raise
    finally:
        torch.serialization.set_crc32_options(crc32)
