"""Reward of math datasets: math-verify's `parse` + `verify` of the response against the answer.

math-verify is imported on first use (it pulls in sympy and an ANTLR LaTeX parser). Its
timeouts use `signal.alarm`, which only works in the main thread; in any other thread the
reward runs without timeouts (math-verify would otherwise refuse to run at all).

A math-verify failure (an exception or a timeout while parsing or comparing) scores 0.0 and is
counted in `MathVerifyReward.num_failures` / `num_timeouts`, never raised: one pathological
sample must not kill a training step. Log the counters with the step's metrics.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from gmpo_megatron.rewards.answer import answer_text

logger = logging.getLogger(__name__)


class MathVerifyReward:
    """`(response, ground_truth, extra) -> 1.0 | 0.0` with failure counters.

    The ground truth is parsed as LaTeX inside `\\boxed{...}` (so `"\\frac{1}{2}"`, `"0.5"` and
    `"x^2"` all work), falling back to math-verify's default extraction. The response is cut at
    its eos marker (see `answer.answer_text`) and parsed with math-verify's default extraction
    (LaTeX, then plain expressions; a final `\\boxed{}` answer is preferred).
    """

    def __init__(self, timeout_seconds: int = 5):
        if not isinstance(timeout_seconds, int) or timeout_seconds < 1:
            raise ValueError(f"timeout_seconds={timeout_seconds!r}; use a whole number of seconds >= 1 (signal.alarm)")
        self.timeout_seconds = timeout_seconds
        self.num_calls = 0
        self.num_failures = 0  # includes timeouts
        self.num_timeouts = 0

    def __call__(self, response: str, ground_truth: str, extra: dict[str, Any] | None = None) -> float:
        import math_verify
        from math_verify.errors import TimeoutException

        self.num_calls += 1
        # signal.alarm only exists for the main thread; elsewhere math-verify needs timeouts off.
        timeout = self.timeout_seconds if threading.current_thread() is threading.main_thread() else None
        try:
            gold = _parse_gold(ground_truth, timeout)
            prediction = math_verify.parse(answer_text(response, extra), parsing_timeout=timeout, raise_on_error=True)
            if not prediction:
                return 0.0  # no answer in the response: wrong, not a verifier failure
            correct = math_verify.verify(gold, prediction, timeout_seconds=timeout, raise_on_error=True)
        except TimeoutException:
            self.num_failures += 1
            self.num_timeouts += 1
            logger.warning("math-verify timed out (ground truth %r); scored 0.0", ground_truth[:80])
            return 0.0
        except Exception as error:  # noqa: BLE001 - any verifier failure scores 0.0, counted
            self.num_failures += 1
            logger.warning("math-verify failed (%s: %s); scored 0.0", type(error).__name__, error)
            return 0.0
        return 1.0 if correct else 0.0

    def check_ground_truth(self, ground_truth: str) -> None:
        """ValueError when math-verify finds no answer in `ground_truth` or times out parsing it
        (every response to it would score 0.0). Costs one parse (1-25 ms)."""
        from math_verify.errors import TimeoutException

        timeout = self.timeout_seconds if threading.current_thread() is threading.main_thread() else None
        try:
            _parse_gold(ground_truth, timeout)
        except TimeoutException:
            raise ValueError(f"math-verify timed out ({self.timeout_seconds} s) parsing the ground truth "
                             f"{ground_truth[:80]!r}") from None
        except ValueError:
            raise
        except Exception as error:  # noqa: BLE001 - math-verify's own parse errors
            raise ValueError(f"math-verify cannot parse the ground truth {ground_truth[:80]!r} "
                             f"({type(error).__name__}: {error})") from None

    def reset_counters(self) -> None:
        self.num_calls = self.num_failures = self.num_timeouts = 0


def _parse_gold(ground_truth: str, timeout: int | None) -> list:
    """The ground truth as LaTeX inside `\\boxed{...}`, else math-verify's default extraction."""
    import math_verify

    gold = math_verify.parse("\\boxed{" + ground_truth + "}",
                             extraction_config=[math_verify.LatexExtractionConfig()],
                             parsing_timeout=timeout, raise_on_error=True)
    if not gold:
        gold = math_verify.parse(ground_truth, parsing_timeout=timeout, raise_on_error=True)
    if not gold:
        raise ValueError(f"math-verify finds no answer in the ground truth {ground_truth!r}")
    return gold
