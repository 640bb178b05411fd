"""init_distributed in a process that already has the layout keeps Megatron's groups: making
them again left the old groups' gloo threads polling (1,960 of them after tests/convert,
tests/megatron and tests/algo, a third of a CI run's CPU in system time)."""

import os
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux)")


def gloo_threads() -> int:
    count = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                count += "gloo" in f.read()
        except OSError:
            pass
    return count


def test_the_same_layout_again_reuses_the_groups(megatron_single_process):
    from megatron.core import parallel_state as ps

    from gmpo_megatron.megatron.parallel import init_distributed

    group = ps.get_data_parallel_group()
    before = gloo_threads()
    for seed in range(3):
        assert init_distributed(seed=seed) == megatron_single_process
    assert ps.get_data_parallel_group() is group
    assert gloo_threads() == before
