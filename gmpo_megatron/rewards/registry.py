"""Reward functions by name, user reward functions by import path, and checked batch scoring.

A reward function maps `(response_text, ground_truth, extra) -> float`. `response_text` is the
decoded response (the answer ends at the eos marker, see `answer.answer_text`), `ground_truth`
the dataset's string, `extra` a dict (the row's `extra_info`, `data_source`, optionally
`eos_token`; may be empty).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from gmpo_megatron.rewards.arithmetic import arithmetic_first_integer_reward, arithmetic_reward
from gmpo_megatron.rewards.countdown import countdown_reward
from gmpo_megatron.rewards.math import MathVerifyReward

RewardFn = Callable[[str, str, dict[str, Any]], float]

# name -> factory; a factory (not the function) so stateful rewards such as math's failure
# counters are fresh for every caller.
_REWARD_FACTORIES: dict[str, Callable[[], RewardFn]] = {
    "arithmetic": lambda: arithmetic_reward,
    "arithmetic_first_integer": lambda: arithmetic_first_integer_reward,
    "countdown": lambda: countdown_reward,
    "math": MathVerifyReward,
}


class RewardError(ValueError):
    """A reward function misbehaved on a sample (raised, or returned a non-finite / non-number)."""


def registered_reward_names() -> list[str]:
    return sorted(_REWARD_FACTORIES)


def register_reward_fn(name: str, fn: RewardFn, *, overwrite: bool = False) -> None:
    """Makes `get_reward_fn(name)` return `fn`. Names with ':' are reserved for import paths."""
    if ":" in name or not name:
        raise ValueError(f"reward name {name!r} must be non-empty and contain no ':' (that form is an import path)")
    if name in _REWARD_FACTORIES and not overwrite:
        raise ValueError(f"reward {name!r} is already registered; pass overwrite=True to replace it")
    if not callable(fn):
        raise ValueError(f"reward {name!r}: {fn!r} is not callable")
    _REWARD_FACTORIES[name] = lambda: fn


def get_reward_fn(name_or_path: str) -> RewardFn:
    """A registered reward by name (`"arithmetic"`, `"countdown"`, `"math"`, ...) or a user
    function by import path: `"my_pkg.rewards:exact_match"` (module importable from
    PYTHONPATH) or `"/abs/path/reward.py:exact_match"` (a file)."""
    if ":" not in name_or_path:
        if name_or_path not in _REWARD_FACTORIES:
            raise ValueError(
                f"unknown reward {name_or_path!r}; registered rewards: {registered_reward_names()}; "
                f"or give a user function as 'package.module:function' or '/path/file.py:function'"
            )
        return _REWARD_FACTORIES[name_or_path]()
    return _load_user_reward_fn(name_or_path)


def _load_user_reward_fn(path: str) -> RewardFn:
    module_name, _, attr_path = path.rpartition(":")
    if not module_name or not attr_path:
        raise ValueError(f"reward path {path!r} must look like 'package.module:function'")
    try:
        if module_name.endswith(".py"):
            if not os.path.isfile(module_name):
                raise FileNotFoundError(f"no file {module_name!r}")
            # A stable, unique module name, registered so the function pickles (worker processes).
            unique_name = "gmpo_user_reward_" + re.sub(r"\W", "_", os.path.abspath(module_name))
            spec = importlib.util.spec_from_file_location(unique_name, module_name)
            module = importlib.util.module_from_spec(spec)
            sys.modules[unique_name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except (ImportError, FileNotFoundError) as error:
        raise ValueError(
            f"cannot import the module of reward {path!r}: {error}; check the module is on "
            f"PYTHONPATH (or give an existing '.py' file path)"
        ) from error
    fn: Any = module
    for attr in attr_path.split("."):
        if not hasattr(fn, attr):
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
            raise ValueError(f"reward {path!r}: module {module_name!r} has no {attr_path!r}; its callables: {public}")
        fn = getattr(fn, attr)
    if not callable(fn):
        raise ValueError(f"reward {path!r} is a {type(fn).__name__}, not a function of (response, ground_truth, extra)")
    return fn


def score_batch(
    fn: RewardFn,
    responses: Sequence[str],
    ground_truths: Sequence[str],
    extras: Sequence[dict[str, Any] | None] | None = None,
) -> list[float]:
    """`[fn(responses[i], ground_truths[i], extras[i] or {}) for i]`, each checked to be a finite
    real number (bools count as 0/1). Raises RewardError naming the sample index and the value
    for a non-number, a NaN/inf, or an exception from `fn`."""
    if extras is None:
        extras = [None] * len(responses)
    if not (len(responses) == len(ground_truths) == len(extras)):
        raise ValueError(
            f"score_batch needs one ground truth and one extra per response; got {len(responses)} "
            f"responses, {len(ground_truths)} ground truths, {len(extras)} extras"
        )
    fn_name = getattr(fn, "__qualname__", type(fn).__name__)
    rewards = []
    for index, (response, ground_truth, extra) in enumerate(zip(responses, ground_truths, extras)):
        try:
            value = fn(response, ground_truth, extra if extra is not None else {})
        except Exception as error:
            raise RewardError(
                f"reward function {fn_name} raised on sample {index} (ground truth {ground_truth!r}): "
                f"{type(error).__name__}: {error}"
            ) from error
        if not isinstance(value, numbers.Real):
            raise RewardError(
                f"reward function {fn_name} returned {value!r} ({type(value).__name__}) for sample {index}; "
                f"a reward must be a Python float such as 1.0 (convert tensors/arrays with float())"
            )
        value = float(value)
        if not math.isfinite(value):
            raise RewardError(
                f"reward function {fn_name} returned {value} for sample {index} (ground truth "
                f"{ground_truth!r}); rewards must be finite: fix the function or clamp its output"
            )
        rewards.append(value)
    return rewards
