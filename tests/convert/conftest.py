"""Session fixtures for the converter tests (helpers live in convert_helpers.py)."""

from __future__ import annotations

import pytest
from convert_helpers import MODELS, make_model, save_model


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory) -> dict[str, str]:
    """kind -> directory of a sharded fp32 safetensors checkpoint."""
    root = tmp_path_factory.mktemp("hf")
    return {kind: save_model(make_model(kind), str(root / kind)) for kind in MODELS}


@pytest.fixture(scope="session")
def megatron_models(hf_models, tmp_path_factory) -> dict[str, str]:
    """kind -> Megatron checkpoint converted at TP1 in this process."""
    from gmpo_megatron.convert.hf_to_megatron import convert_hf_to_megatron

    root = tmp_path_factory.mktemp("megatron")
    return {kind: convert_hf_to_megatron(path, str(root / kind), log=lambda m: None)
            for kind, path in hf_models.items()}
