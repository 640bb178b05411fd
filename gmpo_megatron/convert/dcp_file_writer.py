"""PyTorch Distributed Checkpoint (DCP) data files, written without ``torch.save``'s stream copies.

DCP's ``FileSystemWriter`` appends every chunk to the rank's ``__R_0.distcp`` file as a complete
``torch.save`` archive of the chunk tensor, and its reader ``torch.load``s each archive from the
byte range recorded in ``.metadata``. ``torch.save`` into a Python stream hands the tensor bytes to
the stream in pieces, each copied into a new ``bytes`` object and again into the file buffer
(~1.9 GB/s here, against ~7 GB/s for a kernel file copy).

An archive of a contiguous tensor is the same bytes for every tensor of that dtype and shape,
except for the tensor data itself, provided the archive carries no CRC32 (``torch.save`` with
``set_crc32_options(False)``, which every gmpo-convert save uses; ``torch.load`` does not check it).
``tensor_record`` asks ``torch.save`` itself for those bytes once per (dtype, shape), with
``skip_data`` (it writes the archive and seeks over the data), so no zip code is written here.
``DirectFileWriter`` then writes each chunk as that prefix, the data (``os.write`` of the tensor's
memory, or ``copy_file_range`` from byte ranges of other files), and the suffix. Every record
equals the one ``FileSystemWriter(single_file_per_rank=True, thread_count=1)`` writes, byte for
byte, in the same order (tested); the one difference is that a record copied from a file range of
1 MiB or more may start after a gap of zeros (< 1 page) that puts its data at the same offset
within a page as its source, which makes the kernel copy ~40% faster. DCP reads each record at
the offset ``.metadata`` gives (``.metadata`` is written by ``FileSystemWriter.finish`` itself), so
gaps are invisible to every reader.

The records come from ``torch.serialization`` internals that a torch upgrade could change, so
``direct_records_match_torch_save`` compares one small tensor's record with ``torch.save``'s
archive once per process; when they differ the import writes with torch's ``FileSystemWriter``.
"""

from __future__ import annotations

import functools
import io
import mmap
import os
from dataclasses import dataclass

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _StorageInfo
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from gmpo_megatron.convert.errors import ConversionError
from gmpo_megatron.convert.raw_io import (
    DurableWriter,
    FileRange,
    copy_range,
    tensor_bytes,
    write_all,
)

_PAGE = mmap.PAGESIZE
_ALIGN_MIN_BYTES = 1 << 20  # page-align the data of chunks copied from files from this size on


@dataclass(frozen=True)
class TensorRecord:
    """``torch.save`` of a contiguous tensor (no CRC32): ``prefix``, ``nbytes`` of data, ``suffix``."""

    prefix: bytes
    nbytes: int
    suffix: bytes

    @property
    def length(self) -> int:
        return len(self.prefix) + self.nbytes + len(self.suffix)


class _RecordingStream(io.RawIOBase):
    """A write-only stream keeping what is written and where ``skip_data`` seeks over data."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[bytearray] = [bytearray()]
        self.skipped: list[int] = []
        self.position = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.parts[-1] += view
        self.position += len(view)
        return len(view)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = {io.SEEK_SET: offset, io.SEEK_CUR: self.position + offset}.get(whence)
        if target is None or target < self.position:
            raise io.UnsupportedOperation("the recording stream only skips forward")
        if target > self.position:
            self.skipped.append(target - self.position)
            self.parts.append(bytearray())
            self.position = target
        return self.position

    def tell(self) -> int:
        return self.position


@functools.lru_cache(maxsize=512)
def tensor_record(dtype: torch.dtype, shape: tuple[int, ...]) -> TensorRecord:
    """The archive ``torch.save`` writes for a contiguous ``dtype`` tensor of ``shape``."""
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    stream = _RecordingStream()
    crc32 = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        with torch.serialization.skip_data():
            # torch.empty only reserves address space: skip_data never touches the data.
            torch.save(torch.empty(shape, dtype=dtype), stream)
    finally:
        torch.serialization.set_crc32_options(crc32)
    expected = [nbytes] if nbytes else []
    if stream.skipped != expected:
        raise ConversionError(
            f"torch.save of a {dtype} {list(shape)} tensor skipped {stream.skipped} bytes instead "
            f"of its {nbytes} data bytes: this torch version writes archives differently; use "
            "--writer model")
    return TensorRecord(bytes(stream.parts[0]), nbytes,
                        bytes(stream.parts[-1]) if nbytes else b"")


def torch_save_archive(tensor: torch.Tensor) -> bytes:
    """What ``FileSystemWriter`` stores for ``tensor``: ``torch.save`` without CRC32."""
    crc32 = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        buffer = io.BytesIO()
        torch.save(tensor, buffer)
    finally:
        torch.serialization.set_crc32_options(crc32)
    return buffer.getvalue()


@functools.lru_cache(maxsize=1)
def direct_records_match_torch_save() -> bool:
    """Whether this torch's ``torch.save`` archive of a small tensor is, byte for byte, the
    record ``DirectFileWriter`` writes (prefix, data, suffix). The records are built through
    ``torch.serialization`` internals a torch upgrade may change; checked once per process."""
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    try:
        record = tensor_record(tensor.dtype, tuple(tensor.shape))
    except ConversionError:
        return False
    return record.prefix + bytes(tensor_bytes(tensor)) + record.suffix == torch_save_archive(tensor)


def torch_file_writer(path: str) -> FileSystemWriter:
    """PyTorch's own writer with ``DirectFileWriter``'s settings: the same files, slower."""
    return FileSystemWriter(path, single_file_per_rank=True, sync_files=True, thread_count=1,
                            overwrite=True)


class DirectFileWriter(FileSystemWriter):
    """``FileSystemWriter`` (one file per rank, one thread, fsync'ed) writing chunk data directly.

    The planner's ``resolve_payload(item)``, when it has one, may return a list of ``FileRange``
    (the chunk's raw bytes, in order, somewhere in other files) instead of a tensor; those are
    copied inside the kernel. Otherwise ``resolve_data(item)`` gives the tensor.
    """

    def __init__(self, path: str) -> None:
        super().__init__(path, single_file_per_rank=True, sync_files=True, thread_count=1,
                         overwrite=True)

    def write_data(self, plan, planner) -> Future:
        storage_key = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
        # FileSystemWriter's order: byte entries first, then tensors in plan order.
        items = ([i for i in plan.items if i.type == WriteItemType.BYTE_IO]
                 + [i for i in plan.items if i.type != WriteItemType.BYTE_IO])
        resolve = getattr(planner, "resolve_payload", planner.resolve_data)
        results, position, sources = [], 0, {}
        fd = os.open(os.path.join(self.path, storage_key),
                     os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        durable = DurableWriter(fd)
        try:
            for item in items:
                if item.type == WriteItemType.BYTE_IO:
                    data = planner.resolve_data(item).getbuffer()
                    write_all(fd, data)
                    offset, length = position, len(data)
                else:
                    offset, length = self._write_tensor(fd, position, item, resolve(item), sources)
                results.append(WriteResult(index=item.index, size_in_bytes=length,
                                           storage_data=_StorageInfo(storage_key, offset, length)))
                durable.wrote(offset + length - position)
                position = offset + length
            durable.finish()  # on disk before .metadata names it
        finally:
            durable.wait()
            os.close(fd)
            for source_fd in sources.values():
                os.close(source_fd)
        future: Future = Future()
        future.set_result(results)
        return future

    @staticmethod
    def _write_tensor(fd: int, position: int, item, payload,
                      sources: dict[str, int]) -> tuple[int, int]:
        """Write one chunk's archive at ``position``; returns its (offset, length)."""
        meta = item.tensor_data
        shape, dtype = tuple(meta.chunk.sizes), meta.properties.dtype
        record = tensor_record(dtype, shape)
        offset = position
        if isinstance(payload, torch.Tensor):
            if tuple(payload.shape) != shape or payload.dtype != dtype or payload.device.type != "cpu":
                raise ConversionError(
                    f"{item.index.fqn}{list(meta.chunk.offsets)}: the chunk is a {dtype} "
                    f"{list(shape)} but the data given is a {payload.device.type} {payload.dtype} "
                    f"{list(payload.shape)}")
            data = tensor_bytes(payload)
            write_all(fd, memoryview(record.prefix))
            write_all(fd, data)
        else:
            given = sum(r.nbytes for r in payload)
            if given != record.nbytes:
                raise ConversionError(
                    f"{item.index.fqn}{list(meta.chunk.offsets)}: {given} source bytes for a "
                    f"{record.nbytes}-byte {dtype} {list(shape)} chunk")
            if payload and payload[0].nbytes >= _ALIGN_MIN_BYTES:
                # The kernel copies ~40% faster when source and destination sit at the same
                # offset within a page; DCP locates records by offset, so a gap is harmless.
                offset += (payload[0].offset - position - len(record.prefix)) % _PAGE
                write_all(fd, memoryview(bytes(offset - position)))
            write_all(fd, memoryview(record.prefix))
            for piece in payload:
                if piece.path not in sources:
                    sources[piece.path] = os.open(piece.path, os.O_RDONLY)
                copy_range(sources[piece.path], fd, piece.offset, piece.nbytes)
        write_all(fd, memoryview(record.suffix))
        return offset, record.length


__all__ = ["DirectFileWriter", "FileRange", "TensorRecord", "direct_records_match_torch_save",
           "tensor_record", "torch_file_writer", "torch_save_archive"]
