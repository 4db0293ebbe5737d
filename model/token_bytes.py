"""The exact bytes of a token id, as logprobs report them: byte-level BPE and SentencePiece pieces.

A token's text from the tokenizer's decoder cannot carry half a character (a Cyrillic letter
split across two byte-level tokens decodes to U+FFFD for each), so the bytes are recovered from
the vocabulary piece itself: GPT-2's bytes_to_unicode inverted for byte-level BPE (Llama-3,
SmolLM2), `<0xNN>` byte fallback and `▁` for SentencePiece-style vocabularies. One id at a time,
on demand, cached: never a pass over the whole vocabulary.
"""

from __future__ import annotations

import json
import re
from functools import cache

from tokenizers import Tokenizer

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SPIECE_SPACE = "\u2581"  # ▁


@cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: each printable stand-in character to its byte."""
    # Printable Latin-1 stands for itself; every other byte maps to 256 + its rank among those.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars = list(printable)
    shift = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + shift)
            shift += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _is_byte_level(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer's decoder is (or contains) ByteLevel, read from its own JSON."""
    decoder = tokenizer.decoder
    if decoder is None:
        return False
    state = json.loads(decoder.__getstate__())
    parts = state.get("decoders", [state]) if state.get("type") == "Sequence" else [state]
    return any(part.get("type") == "ByteLevel" for part in parts)


class TokenBytes:
    """Token id -> (text, bytes), where text is the bytes decoded as UTF-8 with errors replaced."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._byte_level = _is_byte_level(tokenizer)
        self._added: dict[int, str] | None = None  # added tokens are literal text, not pieces
        self._cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        found = self._cache.get(token_id)
        if found is None:
            raw = self._bytes(token_id)
            found = self._cache[token_id] = (raw.decode("utf-8", errors="replace"), raw)
        return found

    def _bytes(self, token_id: int) -> bytes:
        if self._added is None:
            decoder = self._tokenizer.get_added_tokens_decoder()
            self._added = {i: t.content for i, t in decoder.items()}
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        piece = self._tokenizer.id_to_token(token_id)
        if piece is None:
            return b""
        if self._byte_level:
            table = _byte_decoder()
            # A character outside the table cannot come from a byte-level vocabulary; kept as text.
            return b"".join(bytes([table[c]]) if c in table else c.encode("utf-8") for c in piece)
        if match := _BYTE_FALLBACK.fullmatch(piece):
            return bytes([int(match.group(1), 16)])
        return piece.replace(_SPIECE_SPACE, " ").encode("utf-8")
