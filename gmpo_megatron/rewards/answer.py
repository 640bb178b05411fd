"""The answer part of a decoded response: the text before the end-of-answer token."""

from __future__ import annotations

from typing import Any

# The task tokenizer's eos (`data.tokenizer.EOS_TOKEN`); a response decoded without
# `skip_special_tokens` still contains it.
DEFAULT_EOS_TOKEN = "<eos>"


def answer_text(response: str, extra: dict[str, Any] | None = None) -> str:
    """The response cut at its first eos marker, whitespace-stripped.

    The eos marker is `extra["eos_token"]` when the caller passes one (e.g. `"<|im_end|>"` for
    Qwen), else `"<eos>"`. Responses decoded with `skip_special_tokens=True` have no marker and
    are only stripped.
    """
    eos_token = (extra or {}).get("eos_token") or DEFAULT_EOS_TOKEN
    end = response.find(eos_token)
    if end >= 0:
        response = response[:end]
    return response.strip()
