"""The rollout-engine interface: what the trainer asks of any generator (embedded, SGLang, vLLM).

An engine is either a model in this process (``EmbeddedEngine``) or a fleet of servers
(``SGLangEngine``); the trainer drives both through ``RolloutEngine``:

- ``generate`` submits every ``prompts x n`` request at once, each with its own sampling seed
  (``request_seed``), keeps at most the engine's bound in flight, collects results as they finish
  (``on_result`` sees them in completion order) and returns them prompt-major;
- ``abort`` stops what is in flight (``generate`` then raises ``GenerationAborted``);
- ``update_weights(weights, version=V)`` is the weight-update lifecycle: pause generation, load
  version V, flush the prefix cache, continue; ``weights`` is a stream of HF-checkpoint-named
  tensors or a ``DiskWeights`` directory, as the engine's ``weight_transports`` say;
- ``health`` probes the engine; ``counters`` are its cumulative fault counts (retries, restarts,
  resubmitted requests), logged per step; ``close`` releases it (and stops servers it started).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Union, runtime_checkable

import numpy as np
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
    sample_index: int = 0  # which of the prompt's n samples this is
    routed_experts: Any = None
    """R3: the experts the engine routed each position through, ``{global MoE layer: [n, top_k]}``
    for positions ``0 .. n-1`` of ``prompt_ids + response_ids`` (``n = len - 1``: the last token is
    never fed to the model), uint8/int16 ids; None when the engine was not asked for them."""
    weight_version: int | None = None  # the engine's weight version that generated it


@dataclass(frozen=True)
class DiskWeights:
    """A weight update as a directory of HF safetensors (``model.safetensors.index.json`` +
    shards, per-expert names), written by the trainer for version ``version``."""

    path: Path
    version: int


WeightSource = Union[Iterable[tuple[str, torch.Tensor]], DiskWeights]


class GenerationAborted(RuntimeError):
    """``generate`` was stopped by ``abort()``."""


@dataclass
class EngineHealth:
    healthy: bool
    detail: str = ""
    servers: list[dict[str, Any]] = field(default_factory=list)


def request_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The sampling seed of request (prompt, sample) of a step: a pure function of the three, in
    [0, 2**63), so a request's seed does not depend on batching, server or arrival order."""
    state = np.random.SeedSequence([seed, prompt_index, sample_index]).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> 1


@runtime_checkable
class RolloutEngine(Protocol):
    weight_transports: tuple[str, ...]
    """What ``update_weights`` accepts: "tensors" (a name/tensor stream), "disk" (DiskWeights)."""

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams, *, seed: int,
                 on_result: Callable[[Rollout], None] | None = None) -> list[Rollout]:
        """`len(prompt_ids) * sampling.n` rollouts, prompt-major: prompt i's n samples are
        contiguous at [i * n, (i + 1) * n). Request (i, s) samples with `request_seed(seed, i, s)`;
        engines that honour seeds exactly (embedded) give the same rollouts for the same seed,
        weights and inputs. `on_result` is called with each rollout as it finishes."""
        ...

    def abort(self) -> None:
        """Stop every request in flight (thread-safe); the running `generate` raises GenerationAborted."""
        ...

    def update_weights(self, weights: WeightSource, *, version: int) -> None:
        """Pause generation, load `weights` (HF checkpoint names, per-expert for MoE) as `version`,
        flush the prefix cache, continue. `version` must be greater than `weight_version`. Unknown
        names, wrong shapes, missing tensors and a version the engine does not confirm are errors."""
        ...

    @property
    def weight_version(self) -> int: ...

    def health(self) -> EngineHealth: ...

    def counters(self) -> dict[str, int]:
        """Cumulative fault counts since the engine started (e.g. retries, restarts)."""
        ...

    def close(self) -> None: ...


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(name: str, value, minimum: int, note: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r}; it must be an integer >= {minimum} {note}".rstrip())
