"""The processes a ``dist_checkpointing.save`` starts, and why none outlives the trainer.

megatron-core 0.16.1's torch_dist save (``FileSystemWriterAsync``, also used for synchronous saves)
starts two kinds of processes:

- per save, one *forked* writer per file bucket (``write_preloaded_data_multiproc``): a copy of the
  trainer (its RSS is the trainer's); killed with the trainer mid-save, it was left running with
  parent 1;
- once per process, a *spawned* ``multiprocessing.Manager`` server for the queue that carries the
  write results back (``_get_write_results_queue``), plus the resource tracker it keeps alive; both
  outlived every run that did not exit cleanly.

``writers_die_with_parent()`` wraps a save: a process forked inside it asks the kernel for SIGKILL
when its parent dies (``prctl(PR_SET_PDEATHSIG)``, Linux), so a SIGKILL / SIGTERM / crash of the
trainer takes its writers with it. It also hands megatron an in-process results queue: a
synchronous save puts and gets the results in the trainer process itself (the forked writers
report through their own fork-context queue), so the Manager is never started. Async saves (which
would need the Manager) are not used.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import signal
import sys

_PR_SET_PDEATHSIG = 1
_state = {"active": False, "parent": 0, "prctl": None, "registered": False}


def _before_fork() -> None:
    if _state["active"]:
        _state["parent"] = os.getpid()


def _after_fork_in_child() -> None:
    if not _state["active"] or _state["prctl"] is None:
        return
    _state["prctl"](_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != _state["parent"]:  # the parent died before prctl took effect
        os._exit(1)


def _register() -> None:
    if _state["registered"]:
        return
    if sys.platform.startswith("linux"):
        _state["prctl"] = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not in the child
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    _state["registered"] = True


def _use_in_process_results_queue() -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not isinstance(filesystem_async._results_queue, queue.Queue):
        filesystem_async._results_queue = queue.Queue()


@contextlib.contextmanager
def writers_die_with_parent():
    """Processes forked inside this block die with this process; no Manager process is started."""
    _register()
    _use_in_process_results_queue()
    _state["active"] = True
    try:
        yield
    finally:
        _state["active"] = False
