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


# -- a real SGLang server ------------------------------------------------------------------------
# One server per model kind for the whole session: tests that need one take it from
# ``sglang_server`` ("moe": the tiny-qwen3-moe preset with routed experts; "dense": a tiny dense
# Qwen3) and push their own weights first (every SGLangEngine syncs at start).
from sglang_support import SGLangTestServer, sglang_missing  # noqa: E402


@pytest.fixture(autouse=True)
def _skip_without_sglang(request):
    if request.node.get_closest_marker("sglang") is not None:
        reason = sglang_missing()
        if reason:
            pytest.skip(reason)


@pytest.fixture(scope="session")
def sglang_server(tmp_path_factory):
    servers: dict[str, SGLangTestServer] = {}
    root = tmp_path_factory.mktemp("sglang_servers")

    def get(kind: str = "moe") -> SGLangTestServer:
        reason = sglang_missing()
        if reason:
            pytest.skip(reason)
        if kind not in servers:
            servers[kind] = SGLangTestServer(kind, root)
        return servers[kind]

    yield get
    for server in servers.values():
        server.process.stop()
