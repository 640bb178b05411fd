"""Procedural task generators and their parquet files."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections import Counter

import pyarrow.parquet as pq
import pytest

from gmpo_megatron.data.tasks import PARQUET_SCHEMA, generate_task_examples, make_task, write_task_parquet
from gmpo_megatron.rewards import arithmetic_reward, countdown_reward, evaluate_expression, parse_countdown_ground_truth


@pytest.mark.parametrize("task", ["arithmetic", "countdown"])
def test_same_seed_same_rows_other_seed_other_rows(task):
    assert generate_task_examples(task, 50, seed=1) == generate_task_examples(task, 50, seed=1)
    assert generate_task_examples(task, 50, seed=1) != generate_task_examples(task, 50, seed=2)


def test_default_arithmetic_is_single_digit_addition_with_answers_0_to_18():
    examples = generate_task_examples("arithmetic", 500, seed=0)
    for example in examples:
        left, right = example.prompt.rstrip("=").split("+")
        assert example.prompt.endswith("=") and len(left) == len(right) == 1
        assert int(example.ground_truth) == int(left) + int(right)
    assert {int(e.ground_truth) for e in examples} == set(range(19))


def test_arithmetic_options_follow_precedence_and_score_their_own_answer():
    examples = generate_task_examples("arithmetic", 200, seed=3, max_operand=30, ops=("+", "-", "*"), num_operands=3)
    for example in examples:
        value, operands = evaluate_expression(example.prompt.rstrip("="))
        assert len(operands) == 3 and max(operands) <= 30
        assert example.ground_truth == str(int(value))
        assert arithmetic_reward(example.solution, example.ground_truth, {}) == 1.0
    assert any(e.ground_truth.startswith("-") for e in examples)


def test_every_countdown_problem_is_solvable_by_its_stored_solution():
    for example in generate_task_examples("countdown", 300, seed=4):
        numbers, target = parse_countdown_ground_truth(example.ground_truth)
        assert example.prompt == example.ground_truth + ":"
        value, used = evaluate_expression(example.solution)  # the reward's own parser
        assert value == target and 1 <= target <= 100
        assert not Counter(used) - Counter(numbers)  # each given number at most once
        assert countdown_reward(example.solution, example.ground_truth, {}) == 1.0


def test_countdown_options_are_respected():
    for example in generate_task_examples("countdown", 100, seed=5, num_numbers=4, max_number=9, max_target=30):
        numbers, target = parse_countdown_ground_truth(example.ground_truth)
        assert len(numbers) == 4 and max(numbers) <= 9 and 1 <= target <= 30


def test_unknown_task_or_option_or_bad_value_is_refused_with_the_allowed_ones():
    with pytest.raises(ValueError, match=r"available tasks: \['arithmetic', 'countdown'\]"):
        make_task("sorting")
    with pytest.raises(ValueError, match="max_operand"):
        make_task("arithmetic", max_operands=5)
    with pytest.raises(ValueError, match="ops"):
        make_task("arithmetic", ops=("/",))
    with pytest.raises(ValueError, match="widen"):
        generate_task_examples("countdown", 1, seed=0, max_number=1, min_target=90, max_target=100, ops=("+",))


def test_parquet_file_has_the_verl_schema(tmp_path):
    path = write_task_parquet("countdown", str(tmp_path / "cd.parquet"), num_rows=20, seed=0)
    table = pq.read_table(path)
    assert table.schema.equals(PARQUET_SCHEMA)
    rows = table.to_pylist()
    examples = generate_task_examples("countdown", 20, seed=0)
    for index, (row, example) in enumerate(zip(rows, examples)):
        assert row == {
            "prompt": example.prompt,
            "reward_model": {"ground_truth": example.ground_truth, "style": "rule"},
            "data_source": "countdown",
            "extra_info": {"index": index, "solution": example.solution},
        }
