"""Raw byte moves between checkpoint files: whole ranges copied inside the kernel, buffers written
without a user-space staging copy. Both converters use these for tensors whose bytes they do not
need to change (the safetensors writer on export, the torch_dist writer on import)."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import torch

from gmpo_megatron.convert.errors import ConversionError

_COPY_BLOCK = 64 << 20  # the user-space fallback's read size


@dataclass(frozen=True)
class FileRange:
    """``nbytes`` raw bytes at absolute offset ``offset`` of file ``path``."""

    path: str
    offset: int
    nbytes: int


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, as a flat view (a copy only if not contiguous)."""
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def write_all(fd: int, data: memoryview) -> None:
    """Write every byte of ``data`` at ``fd``'s position (``os.write`` may write less than asked)."""
    data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
    written = 0
    while written < len(data):
        written += os.write(fd, data[written:])


def copy_range(source_fd: int, dest_fd: int, offset: int, nbytes: int) -> None:
    """Append ``nbytes`` from ``source_fd`` at ``offset`` at ``dest_fd``'s position:
    ``copy_file_range`` (no user-space copy), or pread + write where the kernel or filesystem does
    not offer it."""
    done = 0
    try:
        while done < nbytes:
            n = os.copy_file_range(source_fd, dest_fd, nbytes - done, offset + done)
            if n == 0:
                raise ConversionError(f"source file ended {nbytes - done} bytes early")
            done += n
        return
    except (AttributeError, OSError):
        pass  # copy what is left through user space
    while done < nbytes:
        chunk = os.pread(source_fd, min(_COPY_BLOCK, nbytes - done), offset + done)
        if not chunk:
            raise ConversionError(f"source file ended {nbytes - done} bytes early")
        write_all(dest_fd, memoryview(chunk))
        done += len(chunk)


class DurableWriter:
    """Makes a file that is being appended to durable, overlapping the disk writes with the copying.

    Every ``every`` bytes reported with ``wrote``, an ``fdatasync`` of what is there so far starts
    on a background thread (if the previous one has finished), so the disk is busy while later
    bytes are still being copied; ``finish`` waits for it and ``fsync``s the rest. Measured on a
    2.5 GB file: copy then fsync 0.87 s, the same with background syncs 0.60 s. A failed
    background sync is raised by ``finish``: it never vouches for a file it could not sync.
    """

    def __init__(self, fd: int, every: int = 256 << 20) -> None:
        self.fd = fd
        self.every = every
        self._pending = 0
        self._thread: threading.Thread | None = None
        self._error: OSError | None = None

    def wrote(self, nbytes: int) -> None:
        self._pending += nbytes
        if self._pending < self.every or (self._thread is not None and self._thread.is_alive()):
            return
        self._pending = 0
        self._thread = threading.Thread(target=self._sync, name="gmpo-writeback", daemon=True)
        self._thread.start()

    def _sync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as error:
            self._error = error

    def wait(self) -> None:
        """Wait for a background sync (call before closing the file, also on errors)."""
        if self._thread is not None:
            self._thread.join()

    def finish(self) -> None:
        """Block until every byte written so far is on disk (raises the background error)."""
        self.wait()
        if self._error is not None:
            raise self._error
        os.fsync(self.fd)
