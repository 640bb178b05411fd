"""The rollout-engine interface: what the trainer asks of any generator (embedded, SGLang, vLLM)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to sample responses. Validated on construction.

    n: samples per prompt (the GMPO/GRPO group size).
    temperature: logits are divided by it; 0 means greedy.
    top_p: nucleus filtering, in (0, 1]; 1 = off. top_k: keep the k best tokens; 0 = off.
    max_new_tokens: response length limit (the response of a "length" finish has exactly this many tokens).
    stop_token_ids: sampling one of these ends the response (the token is kept in it); usually
        `(tokenizer.eos_token_id,)`. Engines add no stop token implicitly.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _check_int("n", self.n, 1)
        _check_int("top_k", self.top_k, 0, "(0 turns top-k off)")
        _check_int("max_new_tokens", self.max_new_tokens, 1)
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature={self.temperature!r}; it must be a finite number >= 0 (0 = greedy)")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r}; it must be in (0, 1] (1 turns nucleus sampling off)")
        for token_id in self.stop_token_ids:
            _check_int("each stop_token_ids entry", token_id, 0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Rollout:
    """One sampled response.

    response_log_probs[t] is log p(response_ids[t]) under softmax(logits / temperature) over the
    full vocabulary, BEFORE top-p/top-k filtering (softmax(logits) when greedy). That is the
    quantity the trainer recomputes from its own forward pass (`log_softmax(logits / T)`); the
    filtered distribution could not be recomputed without replaying the engine's filter, and
    using it would bias the importance ratio. The trainer compares the two to log the
    train/rollout mismatch.
    """

    prompt_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    response_log_probs: list[float]
    finish_reason: str  # "stop": a stop token was sampled (it ends response_ids); "length": max_new_tokens reached
    routed_experts: Any = None  # reserved for routing replay (R3): per-token expert ids, when an engine records them


@runtime_checkable
class RolloutEngine(Protocol):
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams, *, seed: int) -> list[Rollout]:
        """`len(prompt_ids) * sampling.n` rollouts, prompt-major: prompt i's n samples are
        contiguous at [i * n, (i + 1) * n). The same seed, weights and inputs give the same rollouts."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, version: int) -> None:
        """Loads tensors named as in the HF checkpoint (per-expert names for MoE); `version` must
        be greater than `weight_version`. Unknown names, wrong shapes and missing tensors are errors."""
        ...

    @property
    def weight_version(self) -> int: ...

    def close(self) -> None: ...


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(name: str, value, minimum: int, note: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r}; it must be an integer >= {minimum} {note}".rstrip())
