"""The character-level tokenizer of the synthetic tasks (arithmetic, countdown).

Built locally with the `tokenizers` library (no hub access): a WordLevel model over single
characters behind a `Split(".")` pre-tokenizer, wrapped as a transformers fast tokenizer so the
trainer, the rollout engine and `AutoTokenizer.from_pretrained(out_dir)` all see a normal HF
tokenizer.

Id layout (fixed; the same build always gives the same ids):

    0 <pad>   1 <bos>   2 <eos> (end of answer)   3 <unk>
    4..       digits 0-9, the symbols `+ - * / ( ) = , : ? [ ] > ` and space, letters a-z
    ..63      <reserved_k> fillers, so the vocab is exactly TASK_VOCAB_SIZE = 64 and every
              tensor-parallel size 1/2/4/8 divides it (no Megatron vocab padding needed).

`>` is included because the countdown prompt reads `"3,5,7->12:"`.

Special tokens are never added implicitly: the tokenizer has no post-processor, so
`tokenizer(text)` and `tokenizer(text, add_special_tokens=True)` both return exactly the ids
of the characters of `text`. Prepend `bos_token_id` / append `eos_token_id` yourself when a
sequence needs them. A character outside the vocabulary (e.g. a newline or an upper-case
letter) encodes to `<unk>`; `data.dataset` rejects prompts that contain it.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

TASK_VOCAB_SIZE = 64

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)

TASK_CHARACTERS = tuple(string.digits) + tuple("+-*/()=,:?[]> ") + tuple(string.ascii_lowercase)


def task_vocab() -> dict[str, int]:
    """The token -> id map of the task tokenizer: specials, characters, reserved fillers."""
    tokens = list(SPECIAL_TOKENS) + list(TASK_CHARACTERS)
    num_reserved = TASK_VOCAB_SIZE - len(tokens)
    if num_reserved < 0:  # guards edits of TASK_CHARACTERS
        raise ValueError(
            f"the task alphabet has {len(tokens)} tokens, more than TASK_VOCAB_SIZE="
            f"{TASK_VOCAB_SIZE}; raise TASK_VOCAB_SIZE to the next multiple of 8"
        )
    tokens += [f"<reserved_{k}>" for k in range(num_reserved)]
    return {token: token_id for token_id, token in enumerate(tokens)}


def build_task_tokenizer(out_dir: str | None = None) -> PreTrainedTokenizerFast:
    """Builds the 64-id character tokenizer; saves it to `out_dir` when given.

    The saved directory loads with `transformers.AutoTokenizer.from_pretrained(out_dir)`.
    The tokenizer has no chat template: chat-list prompts are joined by `data.dataset`.
    """
    vocab = task_vocab()
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    # One piece per character; WordLevel then maps each piece to its id.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    # Fuse joins the pieces with no separator (the default decoder would insert spaces).
    backend.decoder = decoders.Fuse()
    reserved = [token for token in vocab if token.startswith("<reserved_")]
    # Registered as special so "<eos>" in text is one token and decode can skip them.
    backend.add_special_tokens(list(SPECIAL_TOKENS) + reserved)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",  # generation pads on the left
    )
    if len(tokenizer) != TASK_VOCAB_SIZE:
        raise RuntimeError(f"task tokenizer has {len(tokenizer)} ids, expected {TASK_VOCAB_SIZE}")
    if out_dir is not None:
        tokenizer.save_pretrained(out_dir)
    return tokenizer


SPECIAL_TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def special_token_ids(tokenizer) -> dict[str, int]:
    """The tokenizer's bos / eos / pad ids under their HF config names (those it defines).

    A model config.json needs them: `generate()` stops at `eos_token_id`, and without it an
    exported model never stops early."""
    ids = {key: getattr(tokenizer, key, None) for key in SPECIAL_TOKEN_ID_KEYS}
    return {key: value for key, value in ids.items() if value is not None}
