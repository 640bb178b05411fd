"""Rollout engines: the RolloutEngine protocol and the embedded (transformers) engine."""

from gmpo_megatron.rollout.embedded import EmbeddedEngine
from gmpo_megatron.rollout.engine import Rollout, RolloutEngine, SamplingParams

__all__ = ["EmbeddedEngine", "Rollout", "RolloutEngine", "SamplingParams"]
