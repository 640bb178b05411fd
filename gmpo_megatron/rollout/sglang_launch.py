"""Start and stop SGLang servers that the trainer owns (``rollout.sglang.launch``).

A server is ``python -m sglang.launch_server`` in its own process group, with its log in
``<output_dir>/sglang/server_<i>.log``. It dies with the trainer: the launch process gets
``PR_SET_PDEATHSIG`` (SIGKILL when its parent dies, Linux), sglang's own subprocesses kill
themselves when their parent dies, and ``stop()`` kills the whole group.

On a machine without CUDA the CPU engine's flags are added (measured with sglang 0.5.21, see
``docs/sglang.md``): ``SGLANG_USE_CPU_ENGINE=1 --device cpu --attention-backend torch_native
--sampling-backend pytorch --disable-overlap-schedule --cuda-graph-backend-{decode,prefill} disabled
--sleep-on-idle``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

CPU_ARGS = (
    "--device", "cpu", "--attention-backend", "torch_native", "--sampling-backend", "pytorch",
    "--disable-overlap-schedule", "--cuda-graph-backend-decode", "disabled",
    "--cuda-graph-backend-prefill", "disabled", "--sleep-on-idle",
)
# Flags this module sets itself; in extra_args they would silently fight ours.
OWN_FLAGS = ("--model-path", "--host", "--port", "--tp", "--tp-size", "--ep", "--ep-size", "--dp",
             "--dp-size", "--weight-version", "--enable-return-routed-experts", "--mem-fraction-static",
             "--skip-tokenizer-init",
             "--dtype", "--context-length", "--max-total-tokens", "--base-gpu-id")


# what torchrun sets for its workers (besides TORCHELASTIC_*), none of which a server may inherit
TORCHRUN_VARIABLES = frozenset({
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
    "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
})


@dataclass
class ServerSpec:
    """Everything one launched server needs (filled from ``rollout.sglang.launch``)."""

    python: str
    host: str
    port: int
    tp: int = 1
    ep: int = 1
    dp: int = 1
    dtype: str = "auto"
    mem_fraction_static: float | None = None
    context_length: int | None = None
    max_total_tokens: int | None = None
    base_gpu_id: int | None = None
    cpu: bool = False
    routed_experts: bool = False
    skip_tokenizer_init: bool = True
    """The trainer sends token ids and reads token ids: no tokenizer or detokenizer work."""
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None

    def __post_init__(self) -> None:
        clash = [arg for arg in self.extra_args if arg.split("=", 1)[0] in OWN_FLAGS]
        if clash:
            raise ValueError(f"rollout.sglang.launch.extra_args sets {clash}, which the launcher sets "
                             "from its own fields (tp, ep, dp, dtype, port, ...): use those fields")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self, model_path: str | Path, weight_version: int) -> list[str]:
        cmd = [self.python, "-m", "sglang.launch_server", "--model-path", str(model_path),
               "--host", self.host, "--port", str(self.port), "--tp-size", str(self.tp),
               "--weight-version", str(weight_version), "--dtype", self.dtype]
        if self.ep > 1:
            cmd += ["--ep-size", str(self.ep)]
        if self.dp > 1:
            cmd += ["--dp-size", str(self.dp)]
        if self.mem_fraction_static is not None:
            cmd += ["--mem-fraction-static", str(self.mem_fraction_static)]
        if self.context_length is not None:
            cmd += ["--context-length", str(self.context_length)]
        if self.max_total_tokens is not None:
            cmd += ["--max-total-tokens", str(self.max_total_tokens)]
        if self.base_gpu_id is not None:
            cmd += ["--base-gpu-id", str(self.base_gpu_id)]
        if self.routed_experts:
            cmd.append("--enable-return-routed-experts")
        if self.skip_tokenizer_init:
            cmd.append("--skip-tokenizer-init")
        if self.cpu:
            cmd += list(CPU_ARGS)
        return cmd + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # The trainer's torch.distributed / torchrun variables would make sglang join the trainer's
        # group; TORCHELASTIC_USE_AGENT_STORE in particular turns every TCPStore sglang creates into
        # a client of torchrun's agent store, so its scheduler never starts (found under torchrun).
        for key in [k for k in env if k in TORCHRUN_VARIABLES or k.startswith("TORCHELASTIC_")]:
            env.pop(key)
        # log-probs must be of softmax(logits / T), what the trainer recomputes (sglang_http.py)
        env.pop("SGLANG_RETURN_ORIGINAL_LOGPROB", None)
        if self.cpu:
            env["SGLANG_USE_CPU_ENGINE"] = "1"
        env.update(self.env)
        return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    os.setsid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def live_group_members(pgid: int) -> list[int]:
    """Pids of the processes of group ``pgid`` that still run (zombies are dead: they hold no memory
    or port, and only their new parent can reap them). Linux only: elsewhere it returns []."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses
            state, _ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue  # the process went away while we looked
        if int(pgrp) == pgid and state not in ("Z", "X"):
            members.append(int(stat.parent.name))
    return members


def _wait_for_group_exit(pgid: int, timeout_s: float = 30.0) -> None:
    """SIGKILL is delivered at once but a process holding gigabytes takes a while to go; a restart
    must not start a new server while the old scheduler still holds its memory and port."""
    deadline = time.monotonic() + timeout_s
    while (members := live_group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if members:
        raise RuntimeError(f"SGLang server process group {pgid} still has live processes {members} "
                           f"{timeout_s:.0f} s after SIGKILL; kill them by hand (kill -9 {' '.join(map(str, members))})")


class ServerProcess:
    """One launched server: start, liveness, stop (the whole process group)."""

    def __init__(self, spec: ServerSpec) -> None:
        self.spec = spec
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self, model_path: str | Path, weight_version: int) -> None:
        self.stop()
        if not Path(self.spec.python).exists() and os.sep in self.spec.python:
            raise FileNotFoundError(
                f"rollout.sglang.launch.python={self.spec.python!r} does not exist: point it at the "
                "interpreter of an environment with sglang (CPU: tools/sglang_cpu/setup.sh builds "
                ".venv-sglang; its python is .venv-sglang/bin/python)")
        log = open(self.spec.log_path, "ab") if self.spec.log_path else subprocess.DEVNULL
        try:
            if self.spec.log_path:
                log.write(f"\n=== start {self.starts + 1}: {' '.join(self.spec.command(model_path, weight_version))}\n".encode())
                log.flush()
            self.process = subprocess.Popen(
                self.spec.command(model_path, weight_version), env=self.spec.environment(),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
                start_new_session=not sys.platform.startswith("linux"),
            )
        finally:
            if log is not subprocess.DEVNULL:
                log.close()
        self.starts += 1
        if self.spec.log_path:  # for operators (and the fault tests): which process is the server
            Path(self.spec.log_path).with_suffix(".pid").write_text(f"{self.process.pid}\n")

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def log_tail(self, lines: int = 25) -> str:
        if not self.spec.log_path or not Path(self.spec.log_path).exists():
            return "(no log)"
        text = Path(self.spec.log_path).read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self, grace_s: float = 10.0) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is not None:  # the launcher died; its scheduler may not have
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            _wait_for_group_exit(process.pid)
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            process.terminate()
        deadline = time.monotonic() + grace_s
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the group: sglang's scheduler and detokenizer too
        except (ProcessLookupError, PermissionError):
            pass
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        _wait_for_group_exit(process.pid)
