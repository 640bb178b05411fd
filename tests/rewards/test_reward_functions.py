"""Rewards: arithmetic, countdown (own parser, no eval), math (math-verify), registry, score_batch."""

import builtins
import re
import sys
from fractions import Fraction

import pytest

from gmpo_megatron.rewards import (
    ExpressionError,
    MathVerifyReward,
    RewardError,
    arithmetic_first_integer_reward,
    arithmetic_reward,
    countdown_reward,
    evaluate_expression,
    get_reward_fn,
    parse_countdown_ground_truth,
    registered_reward_names,
    score_batch,
)


@pytest.mark.parametrize(
    "response, reward",
    [("19", 1.0), (" 19 \n", 1.0), ("19<eos>", 1.0), ("19<eos>junk after eos", 1.0), ("+19", 1.0),
     ("18", 0.0), ("19.0", 0.0), ("19 20", 0.0), ("nineteen", 0.0), ("", 0.0), ("<eos>19", 0.0), ("9" * 40, 0.0)],
)
def test_arithmetic_reward_is_exact_integer_match_before_eos(response, reward):
    assert arithmetic_reward(response, "19", {}) == reward


def test_arithmetic_reward_uses_the_callers_eos_marker_and_negative_answers():
    assert arithmetic_reward("-3<|im_end|>x", "-3", {"eos_token": "<|im_end|>"}) == 1.0
    assert arithmetic_reward("-3<|im_end|>x", "-3", {}) == 0.0


@pytest.mark.parametrize("response, reward", [("7", 1.0), ("7x", 1.0), ("a7+", 1.0), ("7<eos>8", 1.0), ("17", 0.0), ("x", 0.0), ("<eos>7", 0.0)])
def test_arithmetic_first_integer_reward_grades_the_first_number_before_eos(response, reward):
    assert arithmetic_first_integer_reward(response, "7", {}) == reward


def test_arithmetic_reward_refuses_a_non_integer_ground_truth():
    with pytest.raises(ValueError, match="'x1' is not an integer"):
        arithmetic_reward("1", "x1", {})


@pytest.mark.parametrize(
    "text, value, numbers",
    [("3+5*7", 38, [3, 5, 7]), ("(3+5)*7", 56, [3, 5, 7]), ("7-5-1", 1, [7, 5, 1]), ("8/4/2", 1, [8, 4, 2]),
     ("6/4*2", 3, [6, 4, 2]), (" ( 2 ) ", 2, [2]), ("10/4", Fraction(5, 2), [10, 4])],
)
def test_expression_parser_evaluates_exactly_with_precedence(text, value, numbers):
    assert evaluate_expression(text) == (value, numbers)


@pytest.mark.parametrize(
    "text",
    ["", "3+", "(3+5", "3+5)", "-3+5", "3**2", "3 5", "3//2", "1/0", "2/(3-3)", "x", "3.5+1", "٣+1",
     "__import__('os').system('echo pwned')", "(1)" * 300, "(" * 40 + "1" + ")" * 40, "1" * 12],
)
def test_expression_parser_refuses_anything_but_arithmetic(text):
    with pytest.raises(ExpressionError):
        evaluate_expression(text)


def test_countdown_reward_never_evaluates_code(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("eval/exec/import must not be used by the countdown reward")

    for name in ("eval", "exec", "compile", "__import__"):
        monkeypatch.setattr(builtins, name, forbidden)
    assert countdown_reward("__import__('os').system('true')", "3,5,7->12", {}) == 0.0
    assert countdown_reward("5+7", "3,5,7->12", {}) == 1.0


@pytest.mark.parametrize(
    "response, reward",
    [("5+7", 1.0), ("(7-3)*3", 0.0), ("7+5<eos>", 1.0), ("3*5-7+4", 0.0), ("3+5+7", 0.1), ("(3+5)*7", 0.1),
     ("12", 0.0), ("5+7+7", 0.0), ("5+", 0.0), ("", 0.0), ("7/(5-5)", 0.0), ("5 + 7 = 12", 0.0)],
)
def test_countdown_reward_correct_wellformed_malformed(response, reward):
    assert countdown_reward(response, "3,5,7->12", {}) == reward


def test_countdown_reward_allows_repeated_numbers_as_often_as_given():
    assert countdown_reward("3*3+3", "3,3,3->12", {}) == 1.0
    assert countdown_reward("3*3+3+3", "3,3,3->12", {}) == 0.0


def test_countdown_ground_truth_formats():
    assert parse_countdown_ground_truth("3,5,7->12") == ([3, 5, 7], 12)
    assert parse_countdown_ground_truth('{"numbers": [3, 5, 7], "target": 12}') == ([3, 5, 7], 12)
    assert countdown_reward("5+7", '{"numbers": [3, 5, 7], "target": 12}', {}) == 1.0
    with pytest.raises(ValueError, match="'3,5,7=12' is neither"):
        countdown_reward("5+7", "3,5,7=12", {})


@pytest.mark.parametrize(
    "response, ground_truth, reward",
    [("The answer is $\\boxed{\\frac{1}{2}}$", "0.5", 1.0), ("so the result is 1/2", "\\frac{1}{2}", 1.0),
     ("\\boxed{x^2+2x}", "x(x+2)", 1.0), ("\\boxed{3}", "4", 0.0), ("no idea", "4", 0.0),
     ("\\boxed{42}<eos>\\boxed{7}", "42", 1.0)],
)
def test_math_reward_verifies_equivalent_answers(response, ground_truth, reward):
    fn = MathVerifyReward()
    assert fn(response, ground_truth, {}) == reward
    assert fn.num_failures == 0


def test_math_reward_failures_and_timeouts_score_zero_and_are_counted(monkeypatch):
    import math_verify
    from math_verify.errors import TimeoutException

    fn = MathVerifyReward()

    def times_out(*args, **kwargs):
        raise TimeoutException("slow")

    monkeypatch.setattr(math_verify, "verify", times_out)
    assert fn("\\boxed{1}", "1", {}) == 0.0
    assert (fn.num_failures, fn.num_timeouts) == (1, 1)

    def breaks(*args, **kwargs):
        raise RuntimeError("sympy exploded")

    monkeypatch.setattr(math_verify, "parse", breaks)
    assert fn("\\boxed{1}", "1", {}) == 0.0
    assert (fn.num_calls, fn.num_failures, fn.num_timeouts) == (2, 2, 1)


def test_math_verify_is_imported_lazily():
    code = "import sys, gmpo_megatron.rewards; print('math_verify' in sys.modules)"
    import subprocess

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_registry_returns_the_named_rewards():
    assert {"arithmetic", "arithmetic_first_integer", "countdown", "math"} <= set(registered_reward_names())
    assert get_reward_fn("arithmetic")("7", "7", {}) == 1.0
    assert get_reward_fn("countdown")("5+7", "3,5,7->12", {}) == 1.0
    assert isinstance(get_reward_fn("math"), MathVerifyReward)
    assert get_reward_fn("math") is not get_reward_fn("math")  # fresh failure counters per caller


def test_unknown_reward_name_lists_the_registered_ones():
    with pytest.raises(ValueError, match="unknown reward 'gsm8k'; registered rewards: ") as error:
        get_reward_fn("gsm8k")
    assert str(registered_reward_names()) in str(error.value)


USER_MODULE = '''
def exact(response, ground_truth, extra):
    return float(response.strip() == ground_truth)

def nan_reward(response, ground_truth, extra):
    return float("nan")

def text_reward(response, ground_truth, extra):
    return "1.0"

def raising_reward(response, ground_truth, extra):
    raise KeyError("score")

NOT_CALLABLE = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


def test_user_function_loads_by_module_path_and_by_file_path(user_module, tmp_path):
    assert get_reward_fn(f"{user_module}:exact")(" ab ", "ab", {}) == 1.0
    assert get_reward_fn(f"{tmp_path / 'my_rewards.py'}:exact")("ab", "cd", {}) == 0.0


def test_bad_user_function_paths_are_refused_clearly(user_module):
    with pytest.raises(ValueError, match="cannot import the module of reward 'no_such_module:fn'"):
        get_reward_fn("no_such_module:fn")
    with pytest.raises(ValueError, match=r"has no 'missing'; its callables: \[.*'exact'"):
        get_reward_fn(f"{user_module}:missing")
    with pytest.raises(ValueError, match="is a int, not a function"):
        get_reward_fn(f"{user_module}:NOT_CALLABLE")


def test_score_batch_returns_floats_in_order():
    rewards = score_batch(get_reward_fn("arithmetic"), ["1", "2", "x"], ["1", "3", "4"], [{}, None, {}]).rewards
    assert rewards == [1.0, 0.0, 0.0] and all(type(r) is float for r in rewards)


@pytest.mark.parametrize(
    "fn_name, message",
    [("nan_reward", "returned nan for sample 1"), ("text_reward", r"returned '1.0' \(str\) for sample 0"),
     ("raising_reward", "raised on sample 0 .*KeyError")],
)
def test_score_batch_refuses_non_finite_or_non_number_rewards_naming_the_sample(user_module, fn_name, message):
    fn = get_reward_fn(f"{user_module}:{fn_name}")
    if fn_name == "nan_reward":  # fine on sample 0, NaN on sample 1
        fn = (lambda first: lambda r, g, e: 1.0 if r == "ok" else first(r, g, e))(fn)
    with pytest.raises(RewardError, match=message):
        score_batch(fn, ["ok", "bad"], ["1", "1"])


def test_score_batch_refuses_mismatched_lengths():
    with pytest.raises(ValueError, match="2 responses, 1 ground truths"):
        score_batch(get_reward_fn("arithmetic"), ["1", "2"], ["1"])


def test_score_batch_refuses_a_reward_beyond_the_magnitude_bound_naming_sample_and_value():
    """1e308 is finite, but the group mean of a few of them overflows to inf and the step would end
    as 'loss is nan': refuse it where it is made, naming the sample and the value."""
    from gmpo_megatron.rewards import MAX_ABS_REWARD

    huge = lambda response, ground_truth, extra: 1e308 if response == "big" else 1.0  # noqa: E731
    with pytest.raises(RewardError, match=r"returned 1e\+308 for sample 1 \(ground truth '7'.*"
                                          r"\|reward\| <= " + re.escape(f"{MAX_ABS_REWARD:g}")):
        score_batch(huge, ["ok", "big"], ["1", "7"])
    assert score_batch(lambda r, g, e: -MAX_ABS_REWARD, ["a"], ["1"]).rewards == [-MAX_ABS_REWARD]
