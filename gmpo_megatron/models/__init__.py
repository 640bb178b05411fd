"""Per-architecture HF <-> Megatron tensor mappings: the single source of truth used by the
converters (tools/convert) and by weight sync to the rollout engine."""

from gmpo_megatron.models.base import QwenMapping, canonical_name
from gmpo_megatron.models.qwen2 import Qwen2Mapping
from gmpo_megatron.models.qwen3 import Qwen3Mapping
from gmpo_megatron.models.qwen3_moe import Qwen3MoeMapping

MAPPINGS: dict[str, type[QwenMapping]] = {
    "qwen2": Qwen2Mapping,
    "qwen3": Qwen3Mapping,
    "qwen3_moe": Qwen3MoeMapping,
}


def get_mapping(hf_config) -> QwenMapping:
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in MAPPINGS:
        raise ValueError(f"no HF<->Megatron mapping for model_type {model_type!r}; "
                         f"supported: {sorted(MAPPINGS)}")
    return MAPPINGS[model_type](hf_config)


__all__ = ["MAPPINGS", "QwenMapping", "canonical_name", "get_mapping"]
