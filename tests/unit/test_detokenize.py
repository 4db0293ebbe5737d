"""Incremental detokenization with the real Llama-3 tokenizer, token by token as the engine does it."""

from __future__ import annotations

from typing import Any

import pytest
from tokenizers.decoders import DecodeStream

pytestmark = pytest.mark.timeout(60)

TEXTS = {
    "cyrillic": "Привет, мир! Как дела?",
    "emoji": "Launch 🚀 now 🎉🎉",
    "family-zwj-emoji": "👨‍👩‍👧",
    "family-zwj-emoji-in-text": "Семья: 👨‍👩‍👧 и 👩‍👩‍👦‍👦.",
    "flag-emoji": "🇺🇦 🇯🇵",
    "skin-tone-emoji": "👍🏽👋🏿",
    "cjk": "日本語のテキストと中文文本",
    "korean": "안녕하세요 세계",
    "combining-accents": "e\u0301cole, n\u0303",
    "arabic-rtl": "مرحبا بالعالم",
    "devanagari": "नमस्ते दुनिया",
    "mixed": "Hello мир 🚀 你好 — ok…",
    "whitespace": "  leading\n\n\ttabs  and trailing  ",
    "code": "def f(x):\n    return x ** 2  # 平方",
    "math-symbols": "∑ᵢ xᵢ² ≤ ∞ ≠ π",
}


def stream_pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    """The non-empty pieces DecodeStream yields, fed one id at a time exactly like model/engine.py."""
    decoder = DecodeStream(skip_special_tokens=True)
    pieces = (decoder.step(tokenizer.backend_tokenizer, i) for i in ids)
    return [p for p in pieces if p]


@pytest.mark.parametrize("text", list(TEXTS.values()), ids=list(TEXTS))
def test_stream_round_trips_without_replacement_characters(llama3_tokenizer: Any, text: str) -> None:
    ids = llama3_tokenizer.encode(text, add_special_tokens=False)
    pieces = stream_pieces(llama3_tokenizer, ids)
    assert [p for p in pieces if "\ufffd" in p] == []
    assert "".join(pieces) == text


@pytest.mark.parametrize("text", list(TEXTS.values()), ids=list(TEXTS))
def test_special_tokens_are_skipped_mid_stream(llama3_tokenizer: Any, text: str) -> None:
    """Headers and end-of-turn tokens around the text vanish; they never split or garble it."""
    vocab = llama3_tokenizer.get_vocab()
    specials = [vocab["<|begin_of_text|>"], vocab["<|start_header_id|>"], vocab["<|end_header_id|>"]]
    ids = specials + llama3_tokenizer.encode(text, add_special_tokens=False) + [vocab["<|eot_id|>"]]
    pieces = stream_pieces(llama3_tokenizer, ids)
    assert [p for p in pieces if "\ufffd" in p] == []
    assert "".join(pieces) == text


def test_multibyte_character_is_held_until_complete(llama3_tokenizer: Any) -> None:
    """The rocket emoji spans three byte-level tokens; nothing comes out until the last one arrives."""
    ids = llama3_tokenizer.encode(" 🚀", add_special_tokens=False)
    assert len(ids) == 3
    decoder = DecodeStream(skip_special_tokens=True)
    steps = [decoder.step(llama3_tokenizer.backend_tokenizer, i) for i in ids]
    assert steps == [None, None, " 🚀"]
