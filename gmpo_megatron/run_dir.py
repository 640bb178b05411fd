"""One run per output_dir: the run-directory lock, and what a launch may find there.

Global rank 0 holds an exclusive ``flock`` on ``output_dir/.lock`` for the whole run. The kernel
drops it when the holder exits, however it exits (a SIGKILL included), so a lock is never stale;
the file itself stays and only names the last holder (pid, host, start time, command), which is
what a refused launch prints. flock needs a filesystem that supports it across nodes when ranks
share output_dir (local disks, NFSv4, Lustre/GPFS with flock enabled). Processes forked while the
lock is held close their copy of it, so a leftover child can never keep a directory locked.

``check_output_dir`` decides what a launch may do with what is already there:

- a fresh directory: a new run; ``--resume`` refuses (nothing to resume);
- a run with a finished checkpoint: ``--resume`` continues it; a plain launch refuses;
- a run that stopped before its first finished checkpoint (metrics.jsonl or config.yaml, no
  checkpoint): ``--resume`` starts it again from step 0 (with a warning; its metrics and
  TensorBoard events are replaced); a plain launch refuses and says so.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK = ".lock"


class RunDirInUse(RuntimeError):
    """Another live process holds the output_dir's lock."""


class RunDirLock:
    """Exclusive lock on ``output_dir/.lock``, held until ``release()`` or process exit."""

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / LOCK
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirInUse(
                f"output_dir {str(self.path.parent)!r} is in use by another gmpo-train run "
                f"({holder}; lock {self.path}): wait for it to finish or stop it, or choose "
                "another output_dir"
            ) from None
        self.fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 "command": " ".join(sys.argv)}).encode() + b"\n")
        os.fsync(fd)
        os.register_at_fork(after_in_child=self._close_in_child)

    def _close_in_child(self) -> None:
        # A forked child shares the lock (same open file description): it must not keep it.
        # Closing its descriptor alone drops nothing while the parent still holds its own.
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:
        try:
            self.release()
        except OSError:
            pass


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        holder = {}
    if not holder:
        return "holder unknown"
    return (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}: "
            f"{holder.get('command', '')}")


def has_run(output_dir: Path) -> bool:
    """Whether a run already started in ``output_dir`` (it wrote its config or a metrics row)."""
    return (output_dir / "metrics.jsonl").exists() or (output_dir / "config.yaml").exists()


def check_output_dir(output_dir: Path, *, resume: bool, has_checkpoint: bool) -> bool:
    """Refuse a launch that does not fit what ``output_dir`` holds. Returns True when ``--resume``
    finds a run without any finished checkpoint, which then starts again from step 0."""
    started = has_run(output_dir)
    if not resume:
        if has_checkpoint:
            raise FileExistsError(
                f"output_dir {str(output_dir)!r} already holds a run (metrics.jsonl or "
                "checkpoints): continue it with --resume, or choose another output_dir"
            )
        if started:
            raise FileExistsError(
                f"output_dir {str(output_dir)!r} already holds a run that stopped before its "
                "first finished checkpoint (metrics.jsonl, no checkpoint): --resume starts it "
                "again from step 0 (its metrics are replaced), or choose another output_dir"
            )
        return False
    if has_checkpoint:
        return False
    if not started:
        raise FileNotFoundError(
            f"--resume: no finished checkpoint under {output_dir / 'checkpoints'} and no earlier "
            "run there; run without --resume to start a new run"
        )
    return True
