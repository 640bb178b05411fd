"""Reward functions evaluated in worker processes, in parallel, with a time limit per call.

A slow reward (a verifier, a sandbox) called one sample after another on rank 0 stalls every
step: 2 s per call is 512 s for 256 samples. ``RewardWorkers`` runs `reward.num_workers`
processes that each load the reward by its name or import path (``pkg.module:function`` or
``/path/file.py:function``: the function is imported in the worker, never pickled) and score
chunks of the batch. A call that runs past `timeout_s` is not waited for: its worker is killed
and replaced, the sample scores `timeout_score`, and the rest of that worker's chunk goes back
to the queue. Which samples time out is counted (``BatchScores.timeouts``, logged as
``reward_timeouts``).

Workers are started on first use (only the rank that scores starts them), reused across steps,
stopped by ``close()`` or at interpreter exit, and on Linux die with their parent even if it is
killed (``PR_SET_PDEATHSIG``). Each is a fresh interpreter: forking a process that holds torch
threads and gloo sockets is unsafe, and multiprocessing's spawn would re-run the launching
script in every worker. A worker gets the trainer's ``sys.path``.
"""

from __future__ import annotations

import math
import os
import pickle
import socket
import subprocess
import sys
import time
import weakref
from collections import deque
from collections.abc import Sequence
from multiprocessing.connection import wait
from typing import Any

from gmpo_megatron.rewards.scoring import Outcome, RewardError, call_reward

STARTUP_TIMEOUT_S = 120.0  # a worker that has not loaded the reward by then is a broken set-up
CHUNKS_PER_WORKER = 4  # smaller chunks balance uneven call times; larger ones cost fewer messages


class _Channel:
    """Length-prefixed pickles over a socket. One ``recv`` system call takes every message that
    has arrived, so the many small results of fast rewards cost the trainer few system calls."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self.sock.sendall(len(data).to_bytes(8, "little") + data)

    def _complete(self) -> list:
        messages = []
        while len(self.buffer) >= 8:
            size = int.from_bytes(self.buffer[:8], "little")
            if len(self.buffer) < 8 + size:
                break
            messages.append(pickle.loads(self.buffer[8:8 + size]))
            del self.buffer[:8 + size]
        return messages

    def receive_available(self) -> list:
        """The messages complete after one read (call when readable). EOFError: the peer is gone."""
        data = self.sock.recv(1 << 20)
        if not data:
            raise EOFError
        self.buffer += data
        return self._complete()

    def recv(self):
        """Blocks for one message."""
        while True:
            messages = self._complete()
            if messages:
                assert len(messages) == 1, "recv() is for request/answer exchanges"
                return messages[0]
            data = self.sock.recv(1 << 20)
            if not data:
                raise EOFError
            self.buffer += data

    def poll(self, timeout: float) -> bool:
        """Whether data arrives within `timeout` seconds (before the first message only)."""
        return bool(wait([self.sock], timeout))

    def close(self) -> None:
        self.sock.close()


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent exits, however the parent ends."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the closed socket still ends the loop below
        pass


def serve(fd: int, parent_pid: int) -> None:
    """Worker process: load the reward named by the first message, then score the chunks sent
    until None or until the socket closes."""
    _die_with_parent()
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        return
    conn = _Channel(socket.socket(fileno=fd))
    spec, parent_sys_path = conn.recv()
    sys.path[:] = parent_sys_path  # importable here exactly when importable in the trainer
    from gmpo_megatron.rewards.registry import get_reward_fn

    try:
        fn = get_reward_fn(spec)
    except Exception as error:  # noqa: BLE001 - reported by the parent at start-up
        conn.send(("error", f"{type(error).__name__}: {error}"))
        return
    conn.send(("ready",))
    while True:
        try:
            chunk = conn.recv()
        except (EOFError, OSError):
            return
        if chunk is None:
            return
        for index, response, ground_truth, extra in chunk:
            conn.send((index, call_reward(fn, response, ground_truth, extra)))


class _Worker:
    """One worker process and its socket. A fresh interpreter (not multiprocessing's spawn, which
    re-runs the launching script as __main__ in every child)."""

    def __init__(self, spec: str) -> None:
        ours, theirs = socket.socketpair()
        code = f"from gmpo_megatron.rewards.workers import serve; serve({theirs.fileno()}, {os.getpid()})"
        self.process = subprocess.Popen([sys.executable, "-c", code], pass_fds=(theirs.fileno(),),
                                        stdin=subprocess.DEVNULL)
        theirs.close()
        self.conn = _Channel(ours)
        self.conn.send((spec, list(sys.path)))
        self.pending: deque[int] = deque()  # sample indices sent and not answered yet, in order
        self.deadline = math.inf

    def wait_ready(self, spec: str) -> None:
        if not self.conn.poll(STARTUP_TIMEOUT_S):
            self.stop()
            raise RewardError(f"reward worker did not load reward {spec!r} within {STARTUP_TIMEOUT_S:g} s")
        try:
            message = self.conn.recv()
        except EOFError:
            message = ("error", f"the worker exited with code {self.process.wait()}")
        if message[0] != "ready":
            self.stop()
            raise RewardError(
                f"a reward worker process could not load reward.fn={spec!r}: {message[1]}; workers "
                "load rewards by name or import path, so give 'pkg.module:function' (importable "
                "from PYTHONPATH) or '/path/file.py:function', or set reward.num_workers=0"
            )

    def kill(self) -> None:
        self.process.kill()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        try:
            self.process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.conn.close()


def _stop_all(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.stop()
    workers.clear()


class RewardWorkers:
    """A pool of `num_workers` processes scoring with reward `spec` (see the module doc)."""

    def __init__(self, spec: str, num_workers: int, *, timeout_s: float, timeout_score: float) -> None:
        from gmpo_megatron.rewards.registry import get_reward_fn

        if num_workers < 1:
            raise ValueError(f"num_workers={num_workers}; RewardWorkers needs at least 1 (0: score in-process)")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s}; it must be > 0 seconds")
        get_reward_fn(spec)  # a bad name or path fails here, at start-up, not in the first step
        self.spec, self.num_workers = spec, num_workers
        self.timeout_s, self.timeout_score = float(timeout_s), float(timeout_score)
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _stop_all, self._workers)

    def _start(self) -> None:
        missing = self.num_workers - len(self._workers)
        started = [_Worker(self.spec) for _ in range(missing)]  # start all, then wait: in parallel
        try:
            for worker in started:
                worker.wait_ready(self.spec)
        except RewardError:
            _stop_all(started)
            raise
        self._workers.extend(started)

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        worker.stop()
        self._workers.remove(worker)
        self._start()

    def outcomes(self, responses: Sequence[str], ground_truths: Sequence[str],
                 extras: Sequence[dict[str, Any] | None]) -> list[Outcome]:
        """One `Outcome` per sample (in order); ``("timeout",)`` for a call past `timeout_s`."""
        if len(self._workers) < self.num_workers:
            self._start()
        results: list[Outcome | None] = [None] * len(responses)
        queue = deque(range(len(responses)))
        chunk_size = max(1, math.ceil(len(responses) / (CHUNKS_PER_WORKER * self.num_workers)))
        try:
            while queue or any(w.pending for w in self._workers):
                for worker in self._workers:
                    if queue and not worker.pending:
                        chunk = [queue.popleft() for _ in range(min(chunk_size, len(queue)))]
                        worker.conn.send([(i, responses[i], ground_truths[i], extras[i]) for i in chunk])
                        worker.pending.extend(chunk)
                        worker.deadline = time.monotonic() + self.timeout_s
                busy = [w for w in self._workers if w.pending]
                next_deadline = min(w.deadline for w in busy)
                ready = set(wait([w.conn for w in busy], timeout=max(0.0, next_deadline - time.monotonic())))
                for worker in busy:
                    if worker.conn in ready:
                        self._receive(worker, results)
                    elif time.monotonic() >= worker.deadline:
                        # the call at the head of this worker's chunk ran out of time
                        results[worker.pending.popleft()] = ("timeout",)
                        queue.extendleft(reversed(worker.pending))
                        worker.pending.clear()
                        self._replace(worker)
        except BaseException:
            # a half-read pool would mix this batch's answers into the next one: start afresh
            _stop_all(self._workers)
            raise
        return results  # type: ignore[return-value]

    def _receive(self, worker: _Worker, results: list) -> None:
        try:
            messages = worker.conn.receive_available()
        except (EOFError, ConnectionError):
            raise RewardError(
                f"the reward worker scoring sample {worker.pending[0]} died (exit code "
                f"{worker.process.wait()}); reward.fn={self.spec!r} crashed the process (e.g. a "
                "segfault or os._exit)"
            ) from None
        for index, outcome in messages:
            expected = worker.pending.popleft()
            assert index == expected, (index, expected)
            results[index] = outcome
        if messages:
            worker.deadline = time.monotonic() + self.timeout_s

    def close(self) -> None:
        """Stops the workers (a later `outcomes` call starts new ones)."""
        _stop_all(self._workers)

    def __enter__(self) -> "RewardWorkers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
