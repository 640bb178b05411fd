"""Shared test set-up: offline hub, quiet tokenizers, and a one-process Megatron for in-process tests."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (results are recorded in docs/gpu-results.md)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def megatron_single_process():
    """torch.distributed (gloo, 1 rank) + Megatron parallel state at TP1/PP1/EP1."""
    from gmpo_megatron.megatron.parallel import init_distributed

    return init_distributed(seed=0)
