"""ServerProcess.stop() on a real process group: every member gone (not only the launcher) when
it returns, also one that ignores SIGTERM; zombies left for init count as gone."""

import os
import subprocess
import sys
import time

import pytest

from gmpo_megatron.rollout.sglang_launch import ServerProcess, ServerSpec, live_group_members

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux)")

# a launcher with two children, like sglang's scheduler and detokenizer; all three ignore SIGTERM
GROUP = "trap '' TERM; sleep 300 & sleep 300 & wait"


def start_group() -> ServerProcess:
    server = ServerProcess(ServerSpec(python="python", host="127.0.0.1", port=1))
    server.process = subprocess.Popen(["sh", "-c", GROUP], start_new_session=True)
    deadline = time.monotonic() + 10
    while len(live_group_members(server.pid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(live_group_members(server.pid)) == 3
    return server


def test_stop_leaves_no_live_process_of_the_group():
    server = start_group()
    pid = server.pid
    server.stop(grace_s=0.5)
    assert live_group_members(pid) == []
    assert server.process is None and not server.alive()


def test_stop_after_the_launcher_died_still_kills_its_children():
    server = start_group()
    pid = server.pid
    os.kill(pid, 9)  # only the launcher: its children are orphaned, still in the group
    server.process.wait(timeout=10)
    assert len(live_group_members(pid)) == 2
    server.stop()
    assert live_group_members(pid) == []


def test_the_group_of_another_process_is_not_ours():
    assert live_group_members(os.getpgrp()) != []
    assert live_group_members(2**22 + 12345) == []
