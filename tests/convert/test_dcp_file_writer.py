"""DirectFileWriter writes the files PyTorch's DCP FileSystemWriter writes, byte for byte, with
chunk data copied from memory or file ranges; the raw I/O helpers under it."""

from __future__ import annotations

import errno
import io
import mmap
import os
import re

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException

from gmpo_megatron.convert import raw_io
from gmpo_megatron.convert.dcp_file_writer import DirectFileWriter, tensor_record
from gmpo_megatron.convert.errors import ConversionError
from gmpo_megatron.convert.raw_io import DurableWriter, FileRange, copy_range, tensor_bytes

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int64, torch.int32,
          torch.uint8, torch.bool, torch.float8_e4m3fn]


def random_tensor(dtype: torch.dtype, shape, generator) -> torch.Tensor:
    raw = torch.randint(0, 256, (torch.Size(shape).numel() * dtype.itemsize,), dtype=torch.uint8,
                        generator=generator)
    if dtype == torch.bool:
        return (raw % 2).bool().reshape(shape)
    return raw.view(dtype).reshape(shape)  # every bit pattern, NaNs included


def torch_save_bytes(tensor: torch.Tensor) -> bytes:
    crc32 = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        buffer = io.BytesIO()
        torch.save(tensor, buffer)
    finally:
        torch.serialization.set_crc32_options(crc32)
    return buffer.getvalue()


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(DTYPES), shape=st.lists(st.integers(0, 9), min_size=0, max_size=3),
       seed=st.integers(0, 2**31 - 1))
def test_tensor_record_is_torch_save_without_crc(dtype, shape, seed):
    tensor = random_tensor(dtype, shape, torch.Generator().manual_seed(seed))
    record = tensor_record(dtype, tuple(shape))
    data = bytes(tensor_bytes(tensor))
    assert record.nbytes == len(data)
    written = record.prefix + data + record.suffix
    assert written == torch_save_bytes(tensor)
    assert record.length == len(written)
    loaded = torch.load(io.BytesIO(written), weights_only=True)
    assert loaded.dtype == dtype and loaded.shape == tensor.shape
    assert bytes(tensor_bytes(loaded)) == data  # bit for bit, NaN payloads included


def state_dict(seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "embedding": random_tensor(torch.bfloat16, (37, 5), generator),
        "norm": random_tensor(torch.float32, (5,), generator),
        "scalar": random_tensor(torch.float64, (), generator),
        "ids": random_tensor(torch.int64, (3, 4, 2), generator),
        "empty": torch.empty(0, 3),
        "step": 17,  # not a tensor: a BYTE_IO item
        "config": {"name": "tiny", "layers": [1, 2]},
    }


def save(tmp_path, name: str, writer_class, state: dict, planner=None) -> str:
    directory = str(tmp_path / name)
    writer = writer_class(directory)
    dcp.save(state, storage_writer=writer, planner=planner, no_dist=True)
    return directory


def reference_writer(path: str) -> FileSystemWriter:
    return FileSystemWriter(path, single_file_per_rank=True, sync_files=True, thread_count=1,
                            overwrite=True)


@pytest.fixture()
def no_crc32():
    crc32 = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    yield
    torch.serialization.set_crc32_options(crc32)


def records(directory: str) -> dict:
    """Every stored item's bytes, read where ``.metadata`` says they are."""
    metadata = FileSystemReader(directory).read_metadata()
    out = {}
    for index, info in metadata.storage_data.items():
        with open(os.path.join(directory, info.relative_path), "rb") as f:
            f.seek(info.offset)
            out[index] = f.read(info.length)
    return out


def test_direct_writer_files_equal_pytorch_filesystem_writer(tmp_path, no_crc32):
    seed = int.from_bytes(os.urandom(4), "little")
    state = state_dict(seed)
    ours = save(tmp_path, "ours", DirectFileWriter, state)
    theirs = save(tmp_path, "theirs", reference_writer, state)
    assert sorted(os.listdir(ours)) == sorted(os.listdir(theirs)) == [".metadata", "__0_0.distcp"]
    with open(os.path.join(ours, "__0_0.distcp"), "rb") as a, \
            open(os.path.join(theirs, "__0_0.distcp"), "rb") as b:
        assert a.read() == b.read(), f"seed {seed}"  # no file ranges: no alignment gaps either
    ours_md = FileSystemReader(ours).read_metadata()
    theirs_md = FileSystemReader(theirs).read_metadata()
    assert ours_md.storage_data == theirs_md.storage_data
    assert ours_md.state_dict_metadata == theirs_md.state_dict_metadata
    restored = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None
                for k, v in state.items()}
    restored.update(step=0, config={"name": "", "layers": [0, 0]})
    dcp.load(restored, storage_reader=FileSystemReader(ours), no_dist=True)
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            assert bytes(tensor_bytes(restored[key])) == bytes(tensor_bytes(value)), key
        else:
            assert restored[key] == value, key


class RangePlanner(DefaultSavePlanner):
    """Serves every tensor chunk as byte ranges of ``source`` (the tensor's bytes in shuffled
    pieces with junk between them), as the HF import does."""

    def __init__(self, ranges: dict[str, list[FileRange]]) -> None:
        super().__init__()
        self.ranges = ranges

    def resolve_payload(self, write_item):
        return self.ranges.get(write_item.index.fqn) or self.resolve_data(write_item)


def scattered_source(path: str, tensors: dict[str, torch.Tensor], generator) -> dict:
    """Write each tensor's bytes in 1-3 pieces, in reverse order with junk between: the ranges."""
    ranges: dict[str, list[FileRange]] = {}
    with open(path, "wb") as f:
        for name, tensor in reversed(list(tensors.items())):
            data = bytes(tensor_bytes(tensor))
            cuts = sorted(torch.randint(0, len(data) + 1, (2,), generator=generator).tolist())
            pieces = [(a, b) for a, b in zip([0, *cuts], [*cuts, len(data)]) if b > a]
            located = {}
            for a, b in reversed(pieces):
                f.write(os.urandom(int(torch.randint(0, 50, (1,), generator=generator))))
                located[a] = FileRange(path, f.tell(), b - a)
                f.write(data[a:b])
            ranges[name] = [located[a] for a, _ in pieces]
    return ranges


def test_direct_writer_copies_file_ranges(tmp_path, no_crc32):
    seed = int.from_bytes(os.urandom(4), "little")
    generator = torch.Generator().manual_seed(seed)
    state = state_dict(seed)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and v.numel()}
    ranges = scattered_source(str(tmp_path / "source.bin"), tensors, generator)
    ours = save(tmp_path, "ours", DirectFileWriter, state, RangePlanner(ranges))
    theirs = save(tmp_path, "theirs", reference_writer, state)
    assert records(ours) == records(theirs), f"seed {seed}"


def test_large_ranges_land_page_aligned_with_their_source(tmp_path, no_crc32):
    """A chunk copied from a range of >= 1 MiB starts its data at the source's offset within a
    page (a gap before its record); the records and what loads are unchanged."""
    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    state = {"small": random_tensor(torch.float32, (7, 3), generator),
             "large": random_tensor(torch.bfloat16, (700, 1031), generator),
             "after": random_tensor(torch.int64, (5,), generator)}
    source = str(tmp_path / "source.bin")
    ranges = scattered_source(source, state, generator)
    with open(source, "ab") as f:  # "large" once more, in one piece at an odd offset
        f.write(os.urandom(int(torch.randint(1, 4096, (1,), generator=generator))))
        data = bytes(tensor_bytes(state["large"]))
        ranges["large"] = [FileRange(source, f.tell(), len(data))]
        f.write(data)
    ours = save(tmp_path, "ours", DirectFileWriter, dict(state), RangePlanner(ranges))
    theirs = save(tmp_path, "theirs", reference_writer, dict(state))
    assert records(ours) == records(theirs)
    metadata = FileSystemReader(ours).read_metadata()
    info = next(v for k, v in metadata.storage_data.items() if k.fqn == "large")
    prefix = len(tensor_record(torch.bfloat16, (700, 1031)).prefix)
    assert (info.offset + prefix) % mmap.PAGESIZE == ranges["large"][0].offset % mmap.PAGESIZE
    restored = {k: torch.zeros_like(v) for k, v in state.items()}
    dcp.load(restored, storage_reader=FileSystemReader(ours), no_dist=True)
    for key, value in state.items():
        assert bytes(tensor_bytes(restored[key])) == bytes(tensor_bytes(value)), key


def assert_conversion_error(error: CheckpointException, pattern: str) -> None:
    """DCP wraps what a writer raises; the converter re-raises the ConversionError inside."""
    (failure, _), = error.failures.values()
    assert isinstance(failure, ConversionError) and re.search(pattern, str(failure)), failure


def test_direct_writer_refuses_ranges_of_the_wrong_size(tmp_path, no_crc32):
    state = {"weight": torch.ones(4, 3)}
    source = tmp_path / "source.bin"
    source.write_bytes(bytes(48))
    planner = RangePlanner({"weight": [FileRange(str(source), 0, 44)]})
    with pytest.raises(CheckpointException) as info:
        save(tmp_path, "out", DirectFileWriter, state, planner)
    assert_conversion_error(info.value, r"weight\[0, 0\]: 44 source bytes for a 48-byte")


def test_direct_writer_refuses_a_tensor_of_the_wrong_shape(tmp_path, no_crc32):
    class WrongShape(DefaultSavePlanner):
        def resolve_payload(self, write_item):
            return torch.zeros(3, 4)

    with pytest.raises(CheckpointException) as info:
        save(tmp_path, "out", DirectFileWriter, {"weight": torch.ones(4, 3)}, WrongShape())
    assert_conversion_error(info.value, r"weight\[0, 0\]: the chunk is a torch.float32 \[4, 3\] "
                                        r"but the data given is a cpu torch.float32 \[3, 4\]")


def test_copy_range_falls_back_to_user_space(tmp_path, monkeypatch):
    data = os.urandom(1000)
    (tmp_path / "src").write_bytes(data)

    def unsupported(*args):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(raw_io.os, "copy_file_range", unsupported)
    monkeypatch.setattr(raw_io, "_COPY_BLOCK", 64)
    src = os.open(tmp_path / "src", os.O_RDONLY)
    dst = os.open(tmp_path / "dst", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(dst, b"head")
        copy_range(src, dst, 100, 700)
        with pytest.raises(ConversionError, match="ended 50 bytes early"):
            copy_range(src, dst, 950, 100)
    finally:
        os.close(src)
        os.close(dst)
    assert (tmp_path / "dst").read_bytes()[:704] == b"head" + data[100:800]


def test_durable_writer_raises_a_failed_background_sync():
    read_end, write_end = os.pipe()  # fdatasync on a pipe fails with EINVAL
    try:
        durable = DurableWriter(write_end, every=1)
        durable.wrote(2)
        with pytest.raises(OSError):
            durable.finish()
    finally:
        os.close(read_end)
        os.close(write_end)


def test_direct_records_are_checked_against_torch_save_once_per_process():
    from gmpo_megatron.convert import dcp_file_writer

    dcp_file_writer.direct_records_match_torch_save.cache_clear()
    assert dcp_file_writer.direct_records_match_torch_save() is True
    assert dcp_file_writer.direct_records_match_torch_save.cache_info().misses == 1
    dcp_file_writer.direct_records_match_torch_save()
    assert dcp_file_writer.direct_records_match_torch_save.cache_info().hits >= 1


def test_a_torch_whose_archives_differ_falls_back_to_torchs_writer(hf_models, tmp_path, monkeypatch):
    """If torch.save's archive ever differs from our records, the import writes with torch's own
    FileSystemWriter (same checkpoint, slower) instead of writing records torch would not read."""
    from gmpo_megatron.convert import dcp_file_writer, torch_dist_writer
    from gmpo_megatron.convert.hf_to_megatron import convert_hf_to_megatron
    from gmpo_megatron.convert.verify import verify_weights

    reference = dcp_file_writer.torch_save_archive
    monkeypatch.setattr(dcp_file_writer, "torch_save_archive", lambda tensor: reference(tensor) + b"\0")
    dcp_file_writer.direct_records_match_torch_save.cache_clear()

    def refuse(path):
        raise AssertionError("DirectFileWriter used although its records differ from torch.save's")

    monkeypatch.setattr(torch_dist_writer, "DirectFileWriter", refuse)
    try:
        with pytest.warns(UserWarning, match="torch.save archives differ .*FileSystemWriter"):
            out = convert_hf_to_megatron(hf_models["qwen3_moe"], str(tmp_path / "mcore"), writer="stream",
                                         log=lambda message: None)
        report = verify_weights(hf_models["qwen3_moe"], megatron_dir=out)
        assert report.passed and report.compared > 0
    finally:
        dcp_file_writer.direct_records_match_torch_save.cache_clear()
