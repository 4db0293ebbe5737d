"""The llama.cpp backend's tokenizer, without torch: a GGUF's converted tokenizer.json and chat
template, rendered and encoded as transformers' `apply_chat_template(sanitize_control_tokens=True)`.

Why not transformers itself: importing it imports torch, 2.5 s and 300 MB per worker process,
which is most of a llama.cpp worker's start-up time and memory. The template is rendered by
llama-cpp-python's `Jinja2ChatFormatter` (a sandboxed Jinja environment kept aligned with
transformers'), the text encoded and decoded by the `tokenizers` library; what is ours is the
marking of control tokens in user text, which mirrors transformers' `mark_control_tokens` and
`encode_marked_chat`. tests/unit/test_chat_tokenizer.py checks both give the same token ids.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from tokenizers import Tokenizer

# Private-use characters around a control token found in user text, as transformers marks them.
_START, _END = "\U000f0000", "\U000f0001"


class ChatTokenizer:
    """Duck-types the parts of a transformers tokenizer that model/ uses."""

    def __init__(self, folder: Path) -> None:
        self.backend_tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        template_file = folder / "chat_template.jinja"
        self.chat_template: str | None = (
            template_file.read_text(encoding="utf-8")
            if template_file.is_file()
            else config.get("chat_template")
        )
        self.bos_token = _content(config.get("bos_token"))
        self.eos_token = _content(config.get("eos_token"))
        self.eos_token_id = self.backend_tokenizer.token_to_id(self.eos_token) if self.eos_token else None
        added = self.backend_tokenizer.get_added_tokens_decoder().values()
        self._added = {token.content: bool(token.special) for token in added}
        self._control: dict[str, re.Pattern[str]] = {}

    def get_vocab(self) -> dict[str, int]:
        return dict(self.backend_tokenizer.get_vocab(with_added_tokens=True))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return str(self.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def apply_chat_template(
        self,
        conversation: Sequence[dict[str, Any]],
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **_: Any,  # tokenize/return_dict/sanitize_control_tokens: this always returns sanitized ids
    ) -> list[int]:
        template = chat_template or self.chat_template
        if not template:
            raise ValueError("no chat template")
        control = self._control_tokens(template)
        marked = [{**m, "content": _mark(m["content"], control)} for m in conversation]
        render = _formatter(template, self.bos_token or "", self.eos_token or "", add_generation_prompt)
        text = render(messages=marked, tools=tools).prompt  # type: ignore[arg-type]  # OpenAI-shaped dicts
        return self._encode_marked(text)

    def _control_tokens(self, template: str) -> re.Pattern[str]:
        """The added tokens only the template may write, found once per template, not per request."""
        if template not in self._control:
            tokens = (c for c, special in self._added.items() if special or _in_template(c, template))
            self._control[template] = _pattern(tuple(tokens))
        return self._control[template]

    def _encode_marked(self, text: str) -> list[int]:
        """Marked control tokens as plain text, everything else (the template's own control tokens
        included) as usual; a lone marker is dropped but still separates the text on its sides."""
        markers = _markers(tuple(self._added))
        pieces = markers.split(text)
        ids = self._encode(pieces[0], as_text=False)
        for i, piece in enumerate(pieces[1:], start=1):
            if piece:
                ids += self._encode_piece(piece, as_text=i % 2 == 1)
        return ids

    def _encode_piece(self, piece: str, as_text: bool) -> list[int]:
        # After a newline, as transformers does, so a SentencePiece vocabulary adds no prefix space.
        ids = self._encode("\n" + piece, as_text)
        if ids[: len(self._newline)] == self._newline:
            return ids[len(self._newline) :]
        return self._encode(piece, as_text)

    @cached_property
    def _newline(self) -> list[int]:
        return self._encode("\n", as_text=False)

    def _encode(self, text: str, as_text: bool) -> list[int]:
        if not as_text:
            return list(self.backend_tokenizer.encode(text, add_special_tokens=False).ids)
        # The backend's pipeline without its added tokens, as transformers' _encode_without_added_tokens.
        tok = self.backend_tokenizer
        if tok.normalizer is not None:
            text = tok.normalizer.normalize_str(text)
        splits = [s for s, _ in tok.pre_tokenizer.pre_tokenize_str(text)] if tok.pre_tokenizer else [text]
        return [token.id for split in splits for token in tok.model.tokenize(split)]


def _content(token: Any) -> str | None:
    """A special token in tokenizer_config.json: a string, or an AddedToken's dict."""
    return token.get("content") if isinstance(token, dict) else token


def _in_template(token: str, template: str) -> bool:
    # transformers looks in the template's literals; the whole source is a close superset.
    return not token.isspace() and token in template


def _mark(text: str, control: re.Pattern[str]) -> str:
    text = text.replace(_START, "").replace(_END, "")  # markers in the input could forge a marked token
    return control.sub(f"{_START}\\g<0>{_END}", text)


@lru_cache(maxsize=8)
def _pattern(tokens: tuple[str, ...]) -> re.Pattern[str]:
    longest_first = sorted(tokens, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, longest_first)) or "(?!)")


@lru_cache(maxsize=8)
def _markers(tokens: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile(f"{_START}({_pattern(tokens).pattern}){_END}|[{_START}{_END}]")


@lru_cache(maxsize=8)
def _formatter(template: str, bos: str, eos: str, add_generation_prompt: bool) -> Jinja2ChatFormatter:
    return Jinja2ChatFormatter(
        template, eos_token=eos, bos_token=bos, add_generation_prompt=add_generation_prompt
    )
