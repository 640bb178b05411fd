"""Reward functions by name and user reward functions by import path (scoring: scoring.py).

A reward function maps `(response_text, ground_truth, extra) -> float`. `response_text` is the
decoded response (the answer ends at the eos marker, see `answer.answer_text`), `ground_truth`
the dataset's string, `extra` a dict (the row's `extra_info`, `data_source`, optionally
`eos_token`; may be empty).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from gmpo_megatron.rewards.arithmetic import (
    arithmetic_first_integer_reward,
    arithmetic_reward,
    check_arithmetic_ground_truth,
    check_first_integer_ground_truth,
)
from gmpo_megatron.rewards.countdown import countdown_reward, parse_countdown_ground_truth
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


# name -> the reward's own ground-truth parser: raises ValueError for a ground truth the reward
# cannot use, so a bad row is refused when the data is loaded, not steps later in a reward call.
_GROUND_TRUTH_CHECKS: dict[str, Callable[[], Callable[[str], Any]]] = {
    "arithmetic": lambda: check_arithmetic_ground_truth,
    "arithmetic_first_integer": lambda: check_first_integer_ground_truth,
    "countdown": lambda: parse_countdown_ground_truth,
    "math": lambda: MathVerifyReward().check_ground_truth,
}


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
    _GROUND_TRUTH_CHECKS.pop(name, None)  # a replaced built-in's parser is not fn's


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


def ground_truth_check(name_or_path: str) -> Callable[[str], Any] | None:
    """The reward's ground-truth parser (raises ValueError for a ground truth it cannot use), or
    None when it has none. A user function offers one as its `check_ground_truth` attribute."""
    if name_or_path in _GROUND_TRUTH_CHECKS:
        return _GROUND_TRUTH_CHECKS[name_or_path]()
    return getattr(get_reward_fn(name_or_path), "check_ground_truth", None)


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
