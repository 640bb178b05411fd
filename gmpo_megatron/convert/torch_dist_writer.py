"""Write a Megatron ``torch_dist`` checkpoint straight from HF tensors, without holding the model.

The checkpoint's *structure* comes from Megatron itself: the model is built on the ``meta`` device
(no memory) at TP1/PP1/EP1 and its ``sharded_state_dict()`` goes through the normal
``dist_checkpointing.save`` path (preprocessing, validation, ``common.pt``, ``metadata.json``) and
Megatron's own DCP planner (``MCoreSavePlanner``), so keys, global shapes, chunking and the
``.metadata`` file are the ones Megatron writes for that model. Only the *data* differs in origin:
when PyTorch's ``FileSystemWriter`` asks the planner for a chunk's bytes (``resolve_data``, one
chunk at a time, in plan order), the planner returns the HF tensor(s) for that chunk, transformed by
the mapping and cast to the parameter dtype — the values a model filled by ``load_hf_weights``
would hold. Memory is one chunk (at most one HF tensor group) instead of the whole model, there is no
staging clone and no writer process, and the result reloads at any layout like any other
dist_checkpointing checkpoint (tests compare it with a model-based save and load it at TP2 / PP2 /
EP2 / TP2+EP2).

One process only; under torchrun the model-based path is used (each rank holds its shard).
"""

from __future__ import annotations

import torch

from gmpo_megatron.convert.errors import ConversionError
from gmpo_megatron.convert.torch_dist_reader import _GLU_HALF, _expand
from gmpo_megatron.models.base import QwenMapping


class HFChunkSource:
    """The bytes of one stored chunk (stored key, global offsets, sizes), computed from HF tensors.

    ``read_hf(name)`` returns one full HF tensor. A chunk of a fused fc1 ``[gate; up]`` that is
    exactly the gate or the up half (how Megatron stores fc1) is one HF tensor, read and returned
    as is; any other chunk is cut from the full Megatron tensor built by the mapping.
    """

    def __init__(self, mapping: QwenMapping, read_hf) -> None:
        self.mapping = mapping
        self._read_hf = read_hf
        self._hf_shapes = mapping.expected_hf_shapes()
        self.names_read: set[str] = set()
        self.chunks_served = 0
        self._parts: tuple[str | None, list] = (None, [])
        # The fc1 fast path relies on the mapping building fc1 as cat([gate, up], dim 0).
        gate, up = torch.zeros(2, 3), torch.ones(2, 3)
        fused = mapping.to_megatron("decoder.layers.0.mlp.linear_fc1.weight", [gate, up])
        self._fc1_is_cat = torch.equal(fused, torch.cat([gate, up]))

    def read_hf(self, name: str) -> torch.Tensor:
        self.names_read.add(name)
        return self._read_hf(name)

    def __call__(self, fqn: str, global_size: tuple[int, ...], offsets: tuple[int, ...],
                 sizes: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        name, lead = self._locate(fqn, global_size, offsets, sizes)
        region = tuple(zip(offsets[lead:], sizes[lead:]))
        group = self.mapping.group_of(name)
        tensor = self._fc1_half(name, group, region)
        if tensor is None:
            full = self.mapping.to_megatron(name, [self.read_hf(h) for h in group.hf_names])
            tensor = full
            for dim, (start, length) in enumerate(region):
                tensor = tensor.narrow(dim, start, length)
            if tensor.shape != full.shape:
                tensor = tensor.clone()  # torch.save would otherwise write the whole storage
        if tuple(tensor.shape) != tuple(length for _, length in region):
            raise ConversionError(f"{fqn}{list(offsets)}: HF data has shape "
                                  f"{tuple(tensor.shape)}, the checkpoint chunk {sizes[lead:]}")
        self.chunks_served += 1
        return tensor.to(dtype).reshape(sizes)

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

    def _fc1_half(self, name: str, group, region) -> torch.Tensor | None:
        if (not self._fc1_is_cat or not name.endswith("linear_fc1.weight")
                or len(group.hf_names) != 2):
            return None
        (row, rows), *rest = region
        gate_rows = self._hf_shapes[group.hf_names[0]][0]
        if rows != gate_rows or row not in (0, gate_rows) or any(s != 0 for s, _ in rest):
            return None
        tensor = self.read_hf(group.hf_names[0 if row == 0 else 1])
        return tensor if tuple(tensor.shape[1:]) == tuple(n for _, n in rest) else None


def _streaming_strategy(source: HFChunkSource):
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    class StreamingPlanner(MCoreSavePlanner):
        def resolve_data(self, write_item):
            data = super().resolve_data(write_item)
            if isinstance(data, torch.Tensor) and data.is_meta:
                meta = write_item.tensor_data
                data = source(write_item.index.fqn, tuple(meta.size), tuple(meta.chunk.offsets),
                              tuple(meta.chunk.sizes), meta.properties.dtype)
            return data

    class StreamingStrategy(TorchDistSaveShardedStrategy):
        """Megatron's torch_dist save, synchronous, with PyTorch's in-process file writer."""

        def save(self, sharded_state_dict, checkpoint_dir):
            sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, self.keep_only_main_replica)
            pyt_state_dict = mcore_to_pyt_state_dict(sharded_state_dict, False)
            writer = FileSystemWriter(str(checkpoint_dir), single_file_per_rank=True,
                                      sync_files=True, thread_count=1, overwrite=True)
            planner = StreamingPlanner(dedup_replicated_tensors=not self.keep_only_main_replica,
                                       flatten_state_dict=False)
            dcp_save(pyt_state_dict, storage_writer=writer, planner=planner)

    return StreamingStrategy("torch_dist", 1, thread_count=1)


def save_streaming(meta_model, source: HFChunkSource, directory: str) -> None:
    """Save ``meta_model``'s checkpoint into ``directory`` (empty) with data from ``source``."""
    from megatron.core import dist_checkpointing

    crc32 = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)  # see megatron_ckpt.save_megatron_model
    try:
        dist_checkpointing.save(meta_model.sharded_state_dict(), directory,
                                sharded_strategy=_streaming_strategy(source))
    finally:
        torch.serialization.set_crc32_options(crc32)
