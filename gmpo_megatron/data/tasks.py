"""Procedural, seeded task generators written to verl-style parquet.

- `arithmetic` (the default demo task): `"3+5="` -> `"8"`. The default is tiny on purpose
  (single-digit operands, `+` only, answers 0..18) so a ~1M-parameter random MoE learns it
  with RL in a few hundred steps.
- `countdown` (the GMPO paper's MoE stability task): `"3,5,7->12:"` -> an expression using each
  given number at most once that evaluates to 12. The ground truth is the problem
  `"3,5,7->12"` (what `rewards.countdown` needs); every problem is solvable by construction: the
  target is the value of a random expression over the numbers, kept in `extra_info.solution`.

Parquet schema (verl-compatible; the same for every task so files can be mixed):

    prompt        string
    reward_model  struct<ground_truth: string, style: string = "rule">
    data_source   string                       (the task name)
    extra_info    struct<index: int64, solution: string>   (row index, a reference answer)

Arithmetic is evaluated with `rewards.countdown.evaluate_expression`, the parser the rewards
use, so the generator and the rewards cannot disagree on precedence.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

import pyarrow as pa
import pyarrow.parquet as pq

from gmpo_megatron.rewards.countdown import evaluate_expression, format_countdown_ground_truth

PARQUET_SCHEMA = pa.schema(
    [
        ("prompt", pa.string()),
        ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
        ("data_source", pa.string()),
        ("extra_info", pa.struct([("index", pa.int64()), ("solution", pa.string())])),
    ]
)


@dataclass(frozen=True)
class TaskExample:
    prompt: str
    ground_truth: str
    solution: str  # an answer the task's reward scores 1.0


@dataclass(frozen=True)
class ArithmeticTask:
    """`a op b op c ... =` with operands in [min_operand, max_operand] and standard precedence."""

    name: ClassVar[str] = "arithmetic"
    max_operand: int = 9
    min_operand: int = 0
    ops: tuple[str, ...] = ("+",)
    num_operands: int = 2

    def __post_init__(self):
        object.__setattr__(self, "ops", tuple(self.ops))
        _check_int_at_least("min_operand", self.min_operand, 0)  # the prompt has no unary minus
        _check_int_at_least("max_operand", self.max_operand, self.min_operand)
        _check_int_at_least("num_operands", self.num_operands, 1)
        bad = [op for op in self.ops if op not in ("+", "-", "*")]
        if not self.ops or bad:
            raise ValueError(f"arithmetic ops={self.ops!r}; allowed: a non-empty subset of ('+', '-', '*')")

    def sample(self, rng: random.Random) -> TaskExample:
        expression = str(rng.randint(self.min_operand, self.max_operand))
        for _ in range(self.num_operands - 1):
            expression += rng.choice(self.ops) + str(rng.randint(self.min_operand, self.max_operand))
        value, _ = evaluate_expression(expression)
        answer = str(int(value))  # + - * over integers stays integral
        return TaskExample(prompt=f"{expression}=", ground_truth=answer, solution=answer)


@dataclass(frozen=True)
class CountdownTask:
    """`num_numbers` numbers in [min_number, max_number], a target in [min_target, max_target]
    reachable with `ops` using a random subset (>= 2) of the numbers, each at most once."""

    name: ClassVar[str] = "countdown"
    num_numbers: int = 3
    min_number: int = 1
    max_number: int = 20
    min_target: int = 1
    max_target: int = 100
    ops: tuple[str, ...] = ("+", "-", "*", "/")

    MAX_ATTEMPTS: ClassVar[int] = 10_000

    def __post_init__(self):
        object.__setattr__(self, "ops", tuple(self.ops))
        _check_int_at_least("num_numbers", self.num_numbers, 2)
        _check_int_at_least("min_number", self.min_number, 0)
        _check_int_at_least("max_number", self.max_number, self.min_number)
        _check_int_at_least("min_target", self.min_target, 0)
        _check_int_at_least("max_target", self.max_target, self.min_target)
        bad = [op for op in self.ops if op not in ("+", "-", "*", "/")]
        if not self.ops or bad:
            raise ValueError(f"countdown ops={self.ops!r}; allowed: a non-empty subset of ('+', '-', '*', '/')")

    def sample(self, rng: random.Random) -> TaskExample:
        for _ in range(self.MAX_ATTEMPTS):
            numbers = [rng.randint(self.min_number, self.max_number) for _ in range(self.num_numbers)]
            chosen = rng.sample(numbers, rng.randint(2, self.num_numbers))
            built = self._random_expression(chosen, rng)
            if built is None:
                continue
            solution, value = built
            if value.denominator == 1 and self.min_target <= value <= self.max_target:
                target = int(value)
                return TaskExample(
                    prompt=format_countdown_ground_truth(numbers, target) + ":",
                    ground_truth=format_countdown_ground_truth(numbers, target),
                    solution=solution,
                )
        raise ValueError(
            f"no countdown problem with a target in [{self.min_target}, {self.max_target}] found in "
            f"{self.MAX_ATTEMPTS} attempts for {self}; widen the target range or the number range"
        )

    def _random_expression(self, numbers: list[int], rng: random.Random) -> tuple[str, Fraction] | None:
        """A random binary expression tree over `numbers` (in order): (text, exact value), or None
        when it divides by zero. Composite operands are parenthesised, so the text evaluates
        to the value under any precedence."""
        if len(numbers) == 1:
            return str(numbers[0]), Fraction(numbers[0])
        split = rng.randint(1, len(numbers) - 1)
        left = self._random_expression(numbers[:split], rng)
        right = self._random_expression(numbers[split:], rng)
        if left is None or right is None:
            return None
        (left_text, lhs), (right_text, rhs) = left, right
        op = rng.choice(self.ops)
        if op == "/" and rhs == 0:
            return None
        value = {"+": lambda: lhs + rhs, "-": lambda: lhs - rhs, "*": lambda: lhs * rhs, "/": lambda: lhs / rhs}[op]()
        if split > 1:
            left_text = f"({left_text})"
        if len(numbers) - split > 1:
            right_text = f"({right_text})"
        return f"{left_text}{op}{right_text}", value


TASKS: dict[str, type] = {ArithmeticTask.name: ArithmeticTask, CountdownTask.name: CountdownTask}


def make_task(task: str, **options) -> ArithmeticTask | CountdownTask:
    """The task generator `task` with `options` (dataclass fields), validated."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; available tasks: {sorted(TASKS)}")
    task_cls = TASKS[task]
    allowed = {field.name: field.default for field in dataclasses.fields(task_cls)}
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for task {task!r}; its options and defaults: {allowed}")
    return task_cls(**options)


def generate_task_examples(task: str, num_rows: int, seed: int, **options) -> list[TaskExample]:
    """`num_rows` examples of `task`; the same (task, num_rows, seed, options) gives the same rows."""
    _check_int_at_least("num_rows", num_rows, 1)
    generator = make_task(task, **options)
    rng = random.Random(seed)
    return [generator.sample(rng) for _ in range(num_rows)]


def write_task_parquet(task: str, path: str, num_rows: int, seed: int, **options) -> str:
    """Writes `num_rows` seeded examples of `task` to the parquet file `path` (schema above);
    returns `path`. Load it with `data.dataset.load_prompt_dataset(path, ...)`."""
    examples = generate_task_examples(task, num_rows, seed, **options)
    table = pa.Table.from_pylist(
        [
            {
                "prompt": example.prompt,
                "reward_model": {"ground_truth": example.ground_truth, "style": "rule"},
                "data_source": task,
                "extra_info": {"index": index, "solution": example.solution},
            }
            for index, example in enumerate(examples)
        ],
        schema=PARQUET_SCHEMA,
    )
    pq.write_table(table, path)
    return path


def _check_int_at_least(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r}; it must be an integer >= {minimum}")
