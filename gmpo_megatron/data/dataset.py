"""Prompt datasets: parquet / jsonl rows -> validated, tokenized prompts with ground truths.

Accepted row layouts (one file may use either; files may be mixed):

- verl: `prompt`, `reward_model: {ground_truth, style}`, `data_source`, `extra_info` (what
  `data.tasks.write_task_parquet` writes);
- flat: `prompt` plus a ground-truth column named by `answer_key` (by default the first of
  `ground_truth`, `answer` that exists).

`prompt` is a string or a chat list `[{"role": ..., "content": ...}, ...]`. A chat list goes
through the tokenizer's chat template (`add_generation_prompt=True`) when it has one; without a
template the contents are concatenated with no separator (so a one-message chat gives exactly
its content). Special tokens: a string prompt is encoded with `add_special_tokens` (default
False: the ids are exactly the text's, no implicit BOS); a chat-template prompt never gets extra
special tokens (the template writes them).

Every row is validated on load; the first bad row raises DatasetError naming the file, the row,
the column, what is wrong and the fix.

Iteration is an endless stream of positions `0, 1, 2, ...`; position p is row
`permutation(seed, epoch=p // N)[p % N]`, so the stream is a pure function of (seed, position):
resume exactly by passing a batch's `end_position` as `start_index`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

GROUND_TRUTH_COLUMNS = ("ground_truth", "answer")  # tried in order when answer_key is None


class DatasetError(ValueError):
    """A dataset file or row is malformed; the message names file, row, column and the fix."""


@dataclass(frozen=True)
class PromptRow:
    index: int  # row index in the PromptDataset (files concatenated in the order given)
    prompt_ids: list[int]
    ground_truth: str
    data_source: str
    extra_info: dict[str, Any]


@dataclass(frozen=True)
class PromptBatch:
    """`batch_size` rows; `end_position` is the `start_index` that continues after this batch."""

    indices: list[int]
    prompt_ids: list[list[int]]
    ground_truths: list[str]
    data_sources: list[str]
    extra_infos: list[dict[str, Any]]
    epoch: int  # epoch of the first row
    start_position: int
    end_position: int


@dataclass
class PromptDataset:
    prompt_ids: list[list[int]]
    ground_truths: list[str]
    data_sources: list[str]
    extra_infos: list[dict[str, Any]] = field(repr=False)
    _warned_small: bool = field(default=False, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def __getitem__(self, index: int) -> PromptRow:
        return PromptRow(
            index, self.prompt_ids[index], self.ground_truths[index], self.data_sources[index], self.extra_infos[index]
        )

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        """The row order of `epoch`: a permutation of range(N), a pure function of (seed, epoch). [N]"""
        return np.random.default_rng([seed, epoch]).permutation(len(self))

    def batches(self, batch_size: int, seed: int, start_index: int = 0) -> Iterator[PromptBatch]:
        """Endless batches of `batch_size` rows from stream position `start_index`, reshuffled
        every epoch with `seed`. A batch may straddle two epochs (every row is used once per
        epoch). `batches(b, s, start_index=batch.end_position)` continues exactly after `batch`."""
        for name, value, minimum in (("batch_size", batch_size, 1), ("seed", seed, 0), ("start_index", start_index, 0)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{name}={value!r}; it must be an integer >= {minimum}")
        num_rows = len(self)
        if batch_size > num_rows and not self._warned_small:
            self._warned_small = True  # once per dataset, not once per step
            warnings.warn(
                f"a batch of {batch_size} prompts (rollout.prompts_per_step) is larger than the "
                f"dataset's {num_rows} rows, so every batch repeats rows; add rows (data.num_rows, "
                f"more data.train_files) or lower rollout.prompts_per_step to {num_rows} or less",
                stacklevel=2,
            )
        position, order_epoch, order = int(start_index), -1, None
        while True:
            start_position, indices = position, []
            while len(indices) < batch_size:
                epoch, offset = divmod(position, num_rows)
                if epoch != order_epoch:
                    order_epoch, order = epoch, self.epoch_order(seed, epoch)
                take = min(batch_size - len(indices), num_rows - offset)
                indices.extend(int(i) for i in order[offset : offset + take])
                position += take
            yield PromptBatch(
                indices=indices,
                prompt_ids=[self.prompt_ids[i] for i in indices],
                ground_truths=[self.ground_truths[i] for i in indices],
                data_sources=[self.data_sources[i] for i in indices],
                extra_infos=[self.extra_infos[i] for i in indices],
                epoch=start_position // num_rows,
                start_position=start_position,
                end_position=position,
            )


@dataclass(frozen=True)
class _RowRules:
    """How rows are read and checked (the keyword arguments of load_prompt_dataset)."""

    tokenizer: Any
    max_prompt_length: int
    prompt_key: str
    answer_key: str | None
    data_source_key: str
    add_special_tokens: bool
    check_ground_truth: Callable[[str], Any] | None


def load_prompt_dataset(
    path_or_paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    tokenizer,
    max_prompt_length: int,
    prompt_key: str = "prompt",
    answer_key: str | None = None,
    data_source_key: str = "data_source",
    add_special_tokens: bool = False,
    cache_dir: str | None = None,
    check_ground_truth: Callable[[str], Any] | None = None,
) -> PromptDataset:
    """Loads, validates and tokenizes local parquet (`.parquet`) / jsonl (`.jsonl`, `.json`) files
    through HF `datasets` (see the module doc for layouts). `data_source` defaults to the file's
    stem when the row has none. `check_ground_truth` is the reward's ground-truth parser
    (`rewards.ground_truth_check`), run on every distinct ground truth: a ValueError from it
    refuses the row. Raises DatasetError on the first malformed row."""
    if not isinstance(max_prompt_length, int) or max_prompt_length < 1:
        raise ValueError(f"max_prompt_length={max_prompt_length!r}; it must be an integer >= 1")
    paths = [path_or_paths] if isinstance(path_or_paths, (str, os.PathLike)) else list(path_or_paths)
    if not paths:
        raise DatasetError("no dataset files given; pass a .parquet or .jsonl path (or a list of them)")
    rules = _RowRules(tokenizer, max_prompt_length, prompt_key, answer_key, data_source_key, add_special_tokens,
                      check_ground_truth)
    dataset = PromptDataset([], [], [], [])
    for path in paths:
        _load_file(os.fspath(path), rules, dataset, cache_dir)
    if len(dataset) == 0:
        raise DatasetError(f"{paths}: the files hold no rows; generate data with data.tasks.write_task_parquet")
    return dataset


def _read_columns(path: str, cache_dir: str | None) -> dict[str, list]:
    """column -> list of Python values (structs as dicts), read through HF datasets."""
    import datasets

    builder = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}.get(os.path.splitext(path)[1].lower())
    if builder is None:
        raise DatasetError(f"{path}: unsupported file type; use .parquet, .jsonl or .json")
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: no such file; check the path (local files only, no hub names)")
    _check_readable(path, builder)
    try:
        table = datasets.load_dataset(builder, data_files=path, split="train", cache_dir=cache_dir)
    except Exception as error:  # what is left after _check_readable: pyarrow schema clashes
        hint = "a jsonl column must hold the same type in every row" if builder == "json" else "rewrite the file"
        cause = error.__cause__ or error  # DatasetGenerationError says only "an error occurred"
        raise DatasetError(
            f"{path}: HF datasets could not read the file ({type(cause).__name__}: {cause}); {hint}"
        ) from error
    values = table.to_dict()
    if builder == "json":
        _restore_mixed_type_columns(path, table, values)
    return values


def _check_readable(path: str, builder: str) -> None:
    """The file problems HF datasets reports badly (a StopIteration, a generic
    DatasetGenerationError), as one line naming the file and, for JSON, the line."""
    if os.path.getsize(path) == 0:
        raise DatasetError(f"{path}: the file is empty (0 bytes); write rows into it or drop it from "
                           "data.train_files")
    if builder == "parquet":
        import pyarrow
        import pyarrow.parquet as pq

        try:
            num_rows = pq.ParquetFile(path).metadata.num_rows
        except (pyarrow.ArrowException, OSError) as error:
            raise DatasetError(f"{path}: not a parquet file ({error}); rewrite it with pyarrow or pandas") from None
        if num_rows == 0:
            raise DatasetError(f"{path}: the parquet file has 0 rows; write rows into it or drop it from "
                               "data.train_files")
        return
    import json

    with open(path, encoding="utf-8") as file:
        text = file.read()
    if text.lstrip().startswith("["):  # a .json file may hold one array of rows
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise DatasetError(f"{path}: line {error.lineno} is not valid JSON ({error.msg}); "
                               "write one JSON array of objects, or one JSON object per line") from None
        numbered = enumerate(rows, start=1)
        where = "element"
    else:
        numbered, where = [], "line"
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    numbered.append((number, json.loads(line)))
                except json.JSONDecodeError as error:
                    raise DatasetError(f"{path}: line {number} is not valid JSON ({error.msg} at column "
                                       f"{error.colno}); write one JSON object per line") from None
    count = 0
    for number, row in numbered:
        if not isinstance(row, dict):
            kinds = {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}
            kind = kinds.get(type(row), "null")
            raise DatasetError(f"{path}: {where} {number} is a JSON {kind}, not an object; write each row as "
                               '{"prompt": ..., "ground_truth": ...}')
        count += 1
    if count == 0:
        raise DatasetError(f"{path}: the file holds no rows; write one JSON object per line")


def _load_file(path: str, rules: _RowRules, dataset: PromptDataset, cache_dir: str | None) -> None:
    """Appends the validated, tokenized rows of one file to `dataset`."""
    values = _read_columns(path, cache_dir)
    columns = list(values)

    def fail(row: int, column: str, problem: str, fix: str):
        raise DatasetError(f"{path}: row {row}, column {column!r}: {problem}; {fix}")

    if rules.prompt_key not in values:
        fail(0, rules.prompt_key, f"missing (columns: {columns})", "rename the prompt column or pass prompt_key=")
    ground_truth_column, ground_truth_of = _ground_truth_reader(columns, rules.answer_key, fail)
    prompts, ground_truths = values[rules.prompt_key], values[ground_truth_column]
    data_sources, extra_infos = values.get(rules.data_source_key), values.get("extra_info")
    default_data_source = os.path.splitext(os.path.basename(path))[0]
    tokenizer = rules.tokenizer
    checked: set[str] = set()  # datasets repeat answers; each distinct one is parsed once
    truth_column = "reward_model.ground_truth" if ground_truth_column == "reward_model" else ground_truth_column

    for row in range(len(prompts)):
        text, is_chat_template = _prompt_text(
            prompts[row], tokenizer, lambda problem, fix: fail(row, rules.prompt_key, problem, fix)
        )
        ids = tokenizer(text, add_special_tokens=rules.add_special_tokens and not is_chat_template)["input_ids"]
        if not ids:
            fail(row, rules.prompt_key, "the prompt tokenizes to zero tokens", "drop the row or give it text")
        if len(ids) > rules.max_prompt_length:
            fail(row, rules.prompt_key,
                 f"the prompt has {len(ids)} tokens, more than max_prompt_length={rules.max_prompt_length}",
                 "raise max_prompt_length or drop/shorten the row")
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
            fail(row, rules.prompt_key,
                 f"characters {_unknown_characters(tokenizer, text)} are not in the tokenizer's vocabulary "
                 f"(they encode to {tokenizer.unk_token!r})",
                 "remove them or use a tokenizer that covers them")
        ground_truth = ground_truth_of(row, ground_truths[row])
        if rules.check_ground_truth is not None and ground_truth not in checked:
            try:
                rules.check_ground_truth(ground_truth)
            except ValueError as error:
                fail(row, truth_column, f"the reward cannot use it: {error}",
                     "fix or drop the row, or set reward.fn to the reward this data is for")
            checked.add(ground_truth)

        data_source = default_data_source
        if data_sources is not None and data_sources[row] is not None:
            data_source = data_sources[row]
            if not isinstance(data_source, str) or not data_source:
                fail(row, rules.data_source_key,
                     f"{data_source!r} ({type(data_source).__name__}) is not a non-empty string",
                     "store the source name as a string, e.g. 'countdown'")
        extra_info = {}
        if extra_infos is not None and extra_infos[row] is not None:
            extra_info = extra_infos[row]
            if not isinstance(extra_info, dict):
                fail(row, "extra_info", f"{extra_info!r} ({type(extra_info).__name__}) is not a mapping",
                     "store extra_info as a struct/object, e.g. {'index': 0}")

        dataset.prompt_ids.append(list(ids))
        dataset.ground_truths.append(ground_truth)
        dataset.data_sources.append(data_source)
        dataset.extra_infos.append(dict(extra_info))


def _restore_mixed_type_columns(path: str, table, values: dict[str, list]) -> None:
    """Re-reads, from the file itself, the jsonl columns whose rows mix types.

    `datasets` stores such a column as JSON text and stores a string that is itself valid JSON
    raw, so the string "3" comes back as the number 3 and a correct row would be reported as
    malformed (or a wrong one pass). The file's own values are exact.
    """
    mixed = [column for column, feature in table.features.items() if "Json(" in repr(feature)]
    if not mixed:
        return
    import json

    with open(path, encoding="utf-8") as file:
        text = file.read()
    try:  # a .json file may hold one array of rows instead of one row per line
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path}: not valid JSON lines ({error}); write one JSON object per line") from error
    if not isinstance(rows, list) or len(rows) != len(table):
        raise DatasetError(
            f"{path}: datasets read {len(table)} rows but the file holds {len(rows)} JSON rows; "
            f"check the file is one JSON object per line"
        )
    for column in mixed:
        values[column] = [row.get(column) if isinstance(row, dict) else None for row in rows]


def _ground_truth_reader(columns, answer_key, fail):
    """(column to read, function (row, value) -> validated ground-truth string)."""

    def as_string(row: int, column: str, value) -> str:
        if value is None:
            fail(row, column, "the ground truth is missing (null)", "give every row a ground truth")
        if not isinstance(value, str):
            fail(row, column, f"the ground truth {value!r} is a {type(value).__name__}, not a string",
                 f"store it as a string, e.g. {str(value)!r}")
        return value

    if answer_key is not None:
        if answer_key not in columns:
            fail(0, answer_key, f"missing (columns: {columns})", "pass the ground-truth column's name as answer_key=")
        return answer_key, lambda row, value: as_string(row, answer_key, value)
    if "reward_model" in columns:
        def from_reward_model(row: int, value) -> str:
            if not isinstance(value, dict) or "ground_truth" not in value:
                fail(row, "reward_model", f"{value!r} has no 'ground_truth' field",
                     "write reward_model as {'ground_truth': '...', 'style': 'rule'} (verl schema)")
            return as_string(row, "reward_model.ground_truth", value["ground_truth"])
        return "reward_model", from_reward_model
    for column in GROUND_TRUTH_COLUMNS:
        if column in columns:
            return column, lambda row, value, column=column: as_string(row, column, value)
    candidates = ", ".join(repr(c) for c in ("reward_model",) + GROUND_TRUTH_COLUMNS)
    fail(0, "reward_model", f"no ground-truth column: none of {candidates} exists (columns: {columns})",
         "add reward_model.ground_truth (verl) or pass answer_key= naming the ground-truth column")


def _prompt_text(prompt, tokenizer, fail) -> tuple[str, bool]:
    """(text to tokenize, whether a chat template produced it)."""
    if prompt is None:
        fail("the prompt is missing (null)", "give every row a prompt")
    if isinstance(prompt, str):
        if not prompt.strip():
            fail("the prompt is empty", "drop the row or give it text")
        return prompt, False
    if not isinstance(prompt, list) or not prompt:
        fail(f"{prompt!r} ({type(prompt).__name__}) is neither a string nor a non-empty chat list",
             "store the prompt as text or as [{'role': 'user', 'content': '...'}]")
    for turn, message in enumerate(prompt):
        well_formed = isinstance(message, dict) and all(isinstance(message.get(k), str) for k in ("role", "content"))
        if not well_formed:
            fail(f"chat message {turn} is {message!r}, not {{'role': str, 'content': str}}",
                 "give every message a string role and content")
    if not "".join(message["content"] for message in prompt).strip():
        fail("every chat message is empty", "drop the row or give it text")
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), True
    return "".join(message["content"] for message in prompt), False


def _unknown_characters(tokenizer, text: str) -> list[str]:
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    pieces = zip(encoding["input_ids"], encoding["offset_mapping"])
    return sorted({text[start:end] for token_id, (start, end) in pieces if token_id == tokenizer.unk_token_id})
