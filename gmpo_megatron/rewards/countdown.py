"""Reward of the `countdown` task, with its own arithmetic parser (no `eval`).

The task: given numbers and a target, write an expression over `+ - * /` and parentheses that
uses each given number at most once and evaluates to the target. The ground truth is the
problem itself, `"3,5,7->12"` (numbers, then target); a JSON object
`{"numbers": [3, 5, 7], "target": 12}` (the TinyZero / verl form) is accepted too.

Scores: 0.0 for a malformed answer (anything but numbers, `+ - * /`, parentheses and spaces; a
division by zero; a number that is not given or is used more often than given), `format_score`
(default 0.1) for a well-formed expression over the given numbers with the wrong value, 1.0 for
a correct one. Values are exact rationals (`fractions.Fraction`), so `6/4*2` is exactly 3.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from fractions import Fraction
from typing import Any

from gmpo_megatron.rewards.answer import answer_text

# Answers longer than this are rejected before parsing; a countdown expression over a handful of
# numbers is a few dozen characters.
MAX_EXPRESSION_CHARS = 256
MAX_NESTING_DEPTH = 32
MAX_NUMBER_DIGITS = 9

# ASCII digits only: `\d` would also accept other scripts' digits, which int() converts.
_TOKEN = re.compile(r"\s*(?:([0-9]+)|([-+*/()]))")
_GROUND_TRUTH = re.compile(r"\s*([0-9]+(?:\s*,\s*[0-9]+)*)\s*->\s*([0-9]+)\s*")


class ExpressionError(ValueError):
    """The text is not an arithmetic expression this parser accepts."""


def _tokenize(text: str) -> list[str]:
    tokens, position = [], 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            if text[position:].strip() == "":
                break
            raise ExpressionError(f"unexpected character {text[position]!r} at offset {position}")
        number, symbol = match.groups()
        if number is not None and len(number) > MAX_NUMBER_DIGITS:
            raise ExpressionError(f"number {number[:12]}... has more than {MAX_NUMBER_DIGITS} digits")
        tokens.append(number if number is not None else symbol)
        position = match.end()
    return tokens


class _Parser:
    """Recursive descent over `expr := term (('+'|'-') term)*`,
    `term := factor (('*'|'/') factor)*`, `factor := NUMBER | '(' expr ')'` (no unary minus)."""

    def __init__(self, tokens: list[str]):
        self.tokens = tokens
        self.position = 0
        self.numbers: list[int] = []

    def peek(self) -> str | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise ExpressionError("expression ends early")
        self.position += 1
        return token

    def expr(self, depth: int) -> Fraction:
        value = self.term(depth)
        while self.peek() in ("+", "-"):
            op = self.take()
            right = self.term(depth)
            value = value + right if op == "+" else value - right
        return value

    def term(self, depth: int) -> Fraction:
        value = self.factor(depth)
        while self.peek() in ("*", "/"):
            op = self.take()
            right = self.factor(depth)
            if op == "*":
                value = value * right
            elif right == 0:
                raise ExpressionError("division by zero")
            else:
                value = value / right
        return value

    def factor(self, depth: int) -> Fraction:
        token = self.take()
        if token == "(":
            if depth >= MAX_NESTING_DEPTH:
                raise ExpressionError(f"parentheses nested deeper than {MAX_NESTING_DEPTH}")
            value = self.expr(depth + 1)
            if self.take() != ")":
                raise ExpressionError("missing ')'")
            return value
        if token[0] in "0123456789":
            self.numbers.append(int(token))
            return Fraction(int(token))
        raise ExpressionError(f"expected a number or '(', got {token!r}")


def evaluate_expression(text: str) -> tuple[Fraction, list[int]]:
    """Evaluates an arithmetic expression exactly; returns (value, the numbers it uses in order).

    Accepts non-negative integers, `+ - * /`, parentheses and spaces only, so nothing but
    arithmetic can ever run. Raises ExpressionError for anything else.
    """
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(f"expression has {len(text)} characters, more than {MAX_EXPRESSION_CHARS}")
    tokens = _tokenize(text)
    if not tokens:
        raise ExpressionError("empty expression")
    parser = _Parser(tokens)
    value = parser.expr(depth=0)
    if parser.peek() is not None:
        raise ExpressionError(f"unexpected {parser.peek()!r} after a complete expression")
    return value, parser.numbers


def format_countdown_ground_truth(numbers: list[int], target: int) -> str:
    """`[3, 5, 7], 12 -> "3,5,7->12"` (the form `data.tasks` writes)."""
    return ",".join(str(n) for n in numbers) + f"->{target}"


def parse_countdown_ground_truth(ground_truth: str) -> tuple[list[int], int]:
    """`"3,5,7->12"` or `'{"numbers": [3, 5, 7], "target": 12}'` -> ([3, 5, 7], 12)."""
    match = _GROUND_TRUTH.fullmatch(ground_truth)
    if match is not None:
        return [int(n) for n in match.group(1).split(",")], int(match.group(2))
    try:
        problem = json.loads(ground_truth)
        numbers = [int(n) for n in problem["numbers"]]
        target = problem["target"]
        if not isinstance(target, int) or isinstance(target, bool):
            raise TypeError(f"target {target!r} is not an integer")
        return numbers, target
    except (ValueError, TypeError, KeyError) as error:
        raise ValueError(
            f"countdown ground truth {ground_truth!r} is neither 'n1,n2,...->target' (e.g. "
            f"'3,5,7->12') nor a JSON object with integer 'numbers' and 'target' ({error}); "
            f"regenerate the data with data.tasks.write_task_parquet('countdown', ...)"
        ) from None


def countdown_reward(
    response: str,
    ground_truth: str,
    extra: dict[str, Any] | None = None,
    *,
    format_score: float = 0.1,
) -> float:
    """0.0 malformed, `format_score` well-formed but wrong value, 1.0 correct (see module doc)."""
    numbers, target = parse_countdown_ground_truth(ground_truth)
    try:
        value, used = evaluate_expression(answer_text(response, extra))
    except ExpressionError:
        return 0.0
    if Counter(used) - Counter(numbers):  # a number not given, or used more often than given
        return 0.0
    return 1.0 if value == target else format_score
