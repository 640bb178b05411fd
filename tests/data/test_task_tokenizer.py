"""The 64-id character tokenizer of the synthetic tasks."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers

from gmpo_megatron.data.tokenizer import TASK_CHARACTERS, TASK_VOCAB_SIZE, build_task_tokenizer


def test_vocab_has_exactly_64_ids_divisible_by_every_tp_size():
    tokenizer = build_task_tokenizer()
    assert TASK_VOCAB_SIZE == 64 == len(tokenizer) == len(tokenizer.get_vocab())
    assert sorted(tokenizer.get_vocab().values()) == list(range(64))
    assert all(64 % tp == 0 for tp in (1, 2, 4, 8))


def test_special_tokens_are_distinct_and_fixed():
    tokenizer = build_task_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2, 3)
    assert tokenizer.padding_side == "left"


def test_every_task_character_round_trips_one_token_each():
    tokenizer = build_task_tokenizer()
    text = "".join(TASK_CHARACTERS)
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text) and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
    for prompt in ("12+7=", "3,5,7->12:", "(3+5)*7 - 2/1", "what is [1]? a: b"):
        assert tokenizer.decode(tokenizer(prompt)["input_ids"]) == prompt


def test_encoding_adds_no_special_tokens_even_when_asked_by_default_flag():
    tokenizer = build_task_tokenizer()
    chars = [tokenizer.convert_tokens_to_ids(c) for c in "1+2="]
    assert tokenizer("1+2=")["input_ids"] == chars
    assert tokenizer("1+2=", add_special_tokens=True)["input_ids"] == chars


def test_eos_in_text_is_one_token_and_skipped_on_request():
    tokenizer = build_task_tokenizer()
    ids = tokenizer("19<eos>")["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id and len(ids) == 3
    assert tokenizer.decode(ids, skip_special_tokens=True) == "19"


def test_unknown_characters_encode_to_unk():
    tokenizer = build_task_tokenizer()
    assert tokenizer("A\n")["input_ids"] == [tokenizer.unk_token_id] * 2


def test_same_build_same_ids_and_save_load_round_trip(tmp_path):
    first = build_task_tokenizer(str(tmp_path / "tok"))
    assert first.get_vocab() == build_task_tokenizer().get_vocab()
    loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"), local_files_only=True)
    assert loaded.get_vocab() == first.get_vocab()
    assert (loaded.pad_token_id, loaded.eos_token_id) == (first.pad_token_id, first.eos_token_id)
    assert loaded("3,5,7->12:")["input_ids"] == first("3,5,7->12:")["input_ids"]
    assert loaded.decode(loaded("9+9=18")["input_ids"]) == "9+9=18"
