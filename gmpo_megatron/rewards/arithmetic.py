"""Reward of the `arithmetic` task: exact integer match of the answer."""

from __future__ import annotations

import re
from typing import Any

from gmpo_megatron.rewards.answer import answer_text

# Bounded so that int() never meets a pathological 10k-digit sample.
_INTEGER = re.compile(r"[+-]?\d{1,32}")


def check_arithmetic_ground_truth(ground_truth: str) -> None:
    """ValueError unless `ground_truth` is an integer such as '19' or '-3'."""
    if not _INTEGER.fullmatch(ground_truth.strip()):
        raise ValueError(
            f"arithmetic ground truth {ground_truth!r} is not an integer; the arithmetic reward "
            f"needs integer answers such as '19' or '-3' (check the dataset's ground-truth column)"
        )


def arithmetic_reward(response: str, ground_truth: str, extra: dict[str, Any] | None = None) -> float:
    """1.0 when the text before eos, stripped, is exactly the integer `ground_truth`; else 0.0.

    "19", " 19 " and "19<eos>junk" score 1.0 for ground truth "19"; "19.0", "019x", "" score 0.0.
    A ground truth that is not an integer is a data error and raises ValueError.
    """
    check_arithmetic_ground_truth(ground_truth)
    answer = answer_text(response, extra)
    if not _INTEGER.fullmatch(answer):
        return 0.0
    return 1.0 if int(answer) == int(ground_truth) else 0.0


_FIRST_INTEGER = re.compile(r"\d{1,32}")


def check_first_integer_ground_truth(ground_truth: str) -> None:
    """ValueError unless `ground_truth` is a non-negative integer such as '7'."""
    if not re.fullmatch(r"\d{1,32}", ground_truth.strip()):
        raise ValueError(
            f"arithmetic_first_integer ground truth {ground_truth!r} is not a non-negative integer; "
            "use the 'arithmetic' reward for signed answers"
        )


def arithmetic_first_integer_reward(response: str, ground_truth: str, extra: dict[str, Any] | None = None) -> float:
    """1.0 when the first run of digits in the text before eos is the (non-negative) ground truth.

    The answer-extraction convention of many math graders ("the first number is the answer"), used
    by the tiny CPU demo: a randomly initialised policy almost never emits an exact answer followed
    by eos, but does emit the right first digit often enough (~4% on single-digit sums) for RL to
    start from. "7", "7x", "a7+" score 1.0 for "7"; "17", "x" score 0.0.
    """
    check_first_integer_ground_truth(ground_truth)
    match = _FIRST_INTEGER.search(answer_text(response, extra))
    return 1.0 if match is not None and int(match.group(0)) == int(ground_truth) else 0.0
