"""Loading, validation and resumable iteration of prompt datasets."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gmpo_megatron.data import DatasetError, build_task_tokenizer, load_prompt_dataset, write_task_parquet


@pytest.fixture(scope="module")
def tokenizer():
    return build_task_tokenizer()


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def write_parquet(path, rows) -> str:
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


def load(path, tokenizer, **kwargs):
    return load_prompt_dataset(path, tokenizer=tokenizer, max_prompt_length=kwargs.pop("max_prompt_length", 16), **kwargs)


def test_task_parquet_loads_with_verl_schema(tmp_path, tokenizer):
    path = write_task_parquet("arithmetic", str(tmp_path / "arith.parquet"), num_rows=30, seed=0)
    dataset = load(path, tokenizer)
    assert len(dataset) == 30
    row = dataset[4]
    prompt = tokenizer.decode(row.prompt_ids)
    left, right = prompt.rstrip("=").split("+")
    assert row.ground_truth == str(int(left) + int(right))
    assert row.data_source == "arithmetic" and row.extra_info["index"] == 4
    assert tokenizer.eos_token_id not in row.prompt_ids and tokenizer.bos_token_id not in row.prompt_ids


def test_jsonl_with_flat_answer_column_and_chat_list_prompts(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"prompt": "1+2=", "answer": "3"},
        {"prompt": [{"role": "system", "content": "add: "}, {"role": "user", "content": "4+4="}], "answer": "8"},
    ])
    dataset = load(path, tokenizer)
    assert [tokenizer.decode(ids) for ids in dataset.prompt_ids] == ["1+2=", "add: 4+4="]  # no template: joined
    assert dataset.ground_truths == ["3", "8"]
    assert dataset.data_sources == ["mixed", "mixed"]  # no data_source column: the file stem


def test_ground_truth_column_is_preferred_to_answer_and_answer_key_overrides(tmp_path, tokenizer):
    path = write_parquet(tmp_path / "flat.parquet", [{"prompt": "1+1=", "ground_truth": "2", "answer": "two", "sol": "II"}])
    assert load(path, tokenizer).ground_truths == ["2"]
    assert load(path, tokenizer, answer_key="sol").ground_truths == ["II"]


def test_chat_template_is_applied_when_the_tokenizer_has_one(tmp_path, tokenizer):
    templated = build_task_tokenizer()
    templated.chat_template = "{% for m in messages %}[{{ m['role'][0] }}]{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}[a]{% endif %}"
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": [{"role": "user", "content": "2+2="}], "answer": "4"}])
    assert templated.decode(load(path, templated).prompt_ids[0]) == "[u]2+2=[a]"


def test_several_files_are_concatenated_in_order(tmp_path, tokenizer):
    first = write_task_parquet("arithmetic", str(tmp_path / "a.parquet"), num_rows=3, seed=0)
    second = write_task_parquet("countdown", str(tmp_path / "c.parquet"), num_rows=2, seed=0)
    dataset = load([first, second], tokenizer)
    assert dataset.data_sources == ["arithmetic"] * 3 + ["countdown"] * 2


@pytest.mark.parametrize(
    "rows, row, column, problem",
    [
        ([{"prompt": "1+1=", "answer": "2"}, {"prompt": "", "answer": "3"}], 1, "prompt", "empty"),
        ([{"prompt": "1+1=", "answer": "2"}, {"prompt": "   ", "answer": "3"}], 1, "prompt", "empty"),
        ([{"prompt": "1+1=", "answer": "2"}, {"prompt": 7, "answer": "3"}], 1, "prompt", "neither a string nor"),
        ([{"prompt": "1+1=", "answer": "2"}, {"answer": "3"}], 1, "prompt", r"missing \(null\)"),
        ([{"prompt": "1+1=", "answer": "2"}, {"prompt": [], "answer": "3"}], 1, "prompt", "non-empty chat list"),
        ([{"prompt": [{"role": "user"}], "answer": "3"}], 0, "prompt", "chat message 0"),
        ([{"prompt": "1+1=", "answer": "2"}, {"prompt": "1+1=" * 5, "answer": "2"}], 1, "prompt", "20 tokens, more than max_prompt_length=16"),
        ([{"prompt": "1+1=", "answer": "2"}, {"prompt": "ONE+1=", "answer": "2"}], 1, "prompt", r"\['E', 'N', 'O'\] are not in the tokenizer's vocabulary"),
        ([{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": 4}], 1, "answer", "4 is a int, not a string"),
        ([{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2="}], 1, "answer", "missing"),
        ([{"prompt": "1+1=", "reward_model": {"ground_truth": "2"}}, {"prompt": "2+2=", "reward_model": {"ground_truth": 4}}], 1, "reward_model.ground_truth", "not a string"),
        ([{"prompt": "1+1=", "reward_model": {"style": "rule"}}], 0, "reward_model", "no 'ground_truth'"),
        ([{"prompt": "1+1=", "answer": "2", "data_source": 5}], 0, "data_source", "not a non-empty string"),
        ([{"prompt": "1+1=", "answer": "2", "extra_info": [1]}], 0, "extra_info", "not a mapping"),
        ([{"question": "1+1=", "answer": "2"}], 0, "prompt", r"missing \(columns: \['question', 'answer'\]\)"),
        ([{"prompt": "1+1=", "label": "2"}], 0, "reward_model", "no ground-truth column"),
    ],
)
def test_malformed_row_raises_dataset_error_naming_file_row_and_column(tmp_path, tokenizer, rows, row, column, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DatasetError, match=rf"bad\.jsonl: row {row}, column '{column}': .*{problem}.*; ") as error:
        load(path, tokenizer)
    assert isinstance(error.value, ValueError)


def test_malformed_parquet_row_is_reported_the_same_way(tmp_path, tokenizer):
    path = write_parquet(tmp_path / "bad.parquet", [{"prompt": "1+1=", "ground_truth": "2"}, {"prompt": None, "ground_truth": "3"}])
    with pytest.raises(DatasetError, match=r"bad\.parquet: row 1, column 'prompt'"):
        load(path, tokenizer)


def test_string_ground_truths_that_look_like_numbers_stay_strings_in_mixed_jsonl(tmp_path, tokenizer):
    # datasets decodes a mixed-type jsonl column's "3" as the number 3; the loader must not.
    path = write_jsonl(tmp_path / "mixed_types.jsonl", [{"prompt": "1+2=", "answer": "3"}, {"prompt": "2+2=", "answer": 4}])
    with pytest.raises(DatasetError, match="row 1, column 'answer'"):
        load(path, tokenizer)


def test_missing_file_and_unsupported_type_are_refused(tmp_path, tokenizer):
    with pytest.raises(DatasetError, match="no such file"):
        load(str(tmp_path / "nope.parquet"), tokenizer)
    (tmp_path / "data.csv").write_text("prompt,answer\n1+1=,2\n")
    with pytest.raises(DatasetError, match="unsupported file type"):
        load(str(tmp_path / "data.csv"), tokenizer)


@pytest.fixture(scope="module")
def arithmetic_dataset(tmp_path_factory, tokenizer):
    path = write_task_parquet("arithmetic", str(tmp_path_factory.mktemp("data") / "a.parquet"), num_rows=10, seed=0)
    return load(path, tokenizer)


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def test_each_epoch_visits_every_row_once_in_a_fresh_seeded_order(arithmetic_dataset):
    batches = take(arithmetic_dataset.batches(batch_size=5, seed=3), 6)  # 3 epochs of 10 rows
    epochs = [sum((b.indices for b in batches[i : i + 2]), []) for i in (0, 2, 4)]
    assert all(sorted(epoch) == list(range(10)) for epoch in epochs)
    assert epochs[0] != epochs[1]
    assert [b.epoch for b in batches] == [0, 0, 1, 1, 2, 2]
    again = take(arithmetic_dataset.batches(batch_size=5, seed=3), 6)
    assert [b.indices for b in again] == [b.indices for b in batches]
    other_seed = take(arithmetic_dataset.batches(batch_size=5, seed=4), 2)
    assert [b.indices for b in other_seed] != [b.indices for b in batches[:2]]


def test_resumed_iteration_equals_uninterrupted_iteration(arithmetic_dataset):
    # batch size 4 over 10 rows: batches straddle epoch boundaries
    uninterrupted = take(arithmetic_dataset.batches(batch_size=4, seed=7), 9)
    first_part = take(arithmetic_dataset.batches(batch_size=4, seed=7), 4)
    resumed = take(arithmetic_dataset.batches(batch_size=4, seed=7, start_index=first_part[-1].end_position), 5)
    assert [b.indices for b in first_part + resumed] == [b.indices for b in uninterrupted]
    assert [b.ground_truths for b in first_part + resumed] == [b.ground_truths for b in uninterrupted]
    assert uninterrupted[2].start_position == 8 and uninterrupted[2].end_position == 12


def test_batch_rows_carry_the_dataset_fields(arithmetic_dataset):
    batch = next(arithmetic_dataset.batches(batch_size=3, seed=0))
    for position, index in enumerate(batch.indices):
        assert batch.prompt_ids[position] == arithmetic_dataset.prompt_ids[index]
        assert batch.ground_truths[position] == arithmetic_dataset.ground_truths[index]
        assert batch.extra_infos[position]["index"] == index


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(batch_size=0, seed=0), "batch_size=0"), (dict(batch_size=2, seed=-1), "seed=-1"),
     (dict(batch_size=2, seed=0, start_index=-3), "start_index=-3")],
)
def test_invalid_batch_arguments_are_refused(arithmetic_dataset, kwargs, message):
    with pytest.raises(ValueError, match=message):
        next(arithmetic_dataset.batches(**kwargs))


def test_json_array_file_with_mixed_types_is_read_exactly(tmp_path, tokenizer):
    path = tmp_path / "array.json"
    path.write_text(json.dumps([{"prompt": "1+2=", "answer": "3"}, {"prompt": [{"role": "user", "content": "2+2="}], "answer": "4"}]))
    dataset = load(str(path), tokenizer)
    assert dataset.ground_truths == ["3", "4"]
    assert [tokenizer.decode(ids) for ids in dataset.prompt_ids] == ["1+2=", "2+2="]


@pytest.mark.parametrize("reward, good, bad, problem", [
    ("arithmetic", "-3", "3.5", "'3.5' is not an integer"),
    ("arithmetic_first_integer", "7", "-7", "'-7' is not a non-negative integer"),
    ("countdown", "3,5,7->12", "3,5,7=12", "'3,5,7=12' is neither"),
    ("math", "\\frac{1}{2}", " ", "math-verify finds no answer in"),
])
def test_ground_truths_the_reward_cannot_parse_are_refused_at_load_naming_file_and_row(
        tmp_path, tokenizer, reward, good, bad, problem):
    from gmpo_megatron.rewards import ground_truth_check

    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "1+1=", "ground_truth": good},
                                                 {"prompt": "2+2=", "ground_truth": bad}])
    with pytest.raises(DatasetError, match=rf"data.jsonl: row 1, column 'ground_truth': .*{problem}.*reward.fn"):
        load(path, tokenizer, check_ground_truth=ground_truth_check(reward))
    assert len(load(path, tokenizer)) == 2  # without a check (a reward with no parser) the rows load


def test_a_batch_larger_than_the_dataset_warns_once_with_both_numbers(tmp_path, tokenizer):
    import warnings

    dataset = load(write_jsonl(tmp_path / "three.jsonl", [{"prompt": f"{i}+1=", "ground_truth": "1"} for i in range(3)]),
                   tokenizer)
    with pytest.warns(UserWarning, match=r"batch of 5 prompts .* 3 rows"):
        batch = next(dataset.batches(5, seed=0))
    assert set(batch.indices) == {0, 1, 2} and len(batch.indices) == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        next(dataset.batches(5, seed=0, start_index=batch.end_position))  # once: no second warning
        next(dataset.batches(3, seed=0))


GOOD_LINE = json.dumps({"prompt": "1+1=", "ground_truth": "2"})


@pytest.mark.parametrize("name, content, message", [
    ("empty.jsonl", "", r"empty\.jsonl: the file is empty \(0 bytes\)"),
    ("blank.jsonl", "\n  \n", r"blank\.jsonl: the file holds no rows"),
    ("empty.parquet", "", r"empty\.parquet: the file is empty \(0 bytes\)"),
    ("zero.parquet", "zero-rows", r"zero\.parquet: the parquet file has 0 rows"),
    ("junk.parquet", "not parquet at all", r"junk\.parquet: not a parquet file"),
    ("broken.jsonl", f"{GOOD_LINE}\n{GOOD_LINE}\n" + '{"prompt": "2+2=", "ground_truth": "4"\n',
     r"broken\.jsonl: line 3 is not valid JSON \(.*\); write one JSON object per line"),
    ("list.jsonl", f"{GOOD_LINE}\n[1, 2]\n", r"list\.jsonl: line 2 is a JSON list, not an object"),
])
def test_empty_and_unreadable_files_are_one_clear_line_naming_file_and_line(tmp_path, tokenizer, name, content, message):
    path = tmp_path / name
    if content == "zero-rows":
        pq.write_table(pa.Table.from_pylist([], schema=pa.schema([("prompt", pa.string()), ("ground_truth", pa.string())])),
                       str(path))
    else:
        path.write_text(content)
    with pytest.raises(DatasetError, match=message) as error:
        load(str(path), tokenizer)
    assert "\n" not in str(error.value) and "same type in every row" not in str(error.value)


def test_the_generated_task_file_is_not_reused_for_other_task_settings(tmp_path):
    """A relaunch into the same output_dir with another data.num_rows or task option generates
    its own file instead of silently reading the old one."""
    from gmpo_megatron.components import load_dataset
    from gmpo_megatron.config import load_config
    from gmpo_megatron.data.tokenizer import build_task_tokenizer

    tokenizer = build_task_tokenizer()
    small = load_dataset(load_config("examples/moe/tiny_cpu.yaml", ["data.num_rows=50"]), tokenizer, tmp_path, 0)
    large = load_dataset(load_config("examples/moe/tiny_cpu.yaml", ["data.num_rows=80"]), tokenizer, tmp_path, 0)
    assert (len(small), len(large)) == (50, 80)
    assert len(list((tmp_path / "data").glob("arithmetic_seed1_*.parquet"))) == 2
