"""The llama.cpp workers' torch-free ChatTokenizer renders every conversation to exactly the ids that
transformers' apply_chat_template(sanitize_control_tokens=True) gives, hostile text included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from model.chat import render_prompt
from model.loading import EMBEDDED_MODEL_ID, ModelNotAvailable, resolve_source, tokenizer_folder
from model.types import ChatMessage
from tests import needs
from tests.processes import ROOT
from tests.unit.test_special_tokens import INJECTIONS, ORDINARY, SHAPES

# ChatTokenizer renders with llama-cpp-python's Jinja2ChatFormatter.
needs.module("llama_cpp", "pip install -e '.[llamacpp]'; make install-dev does", package="llama-cpp-python")

from model.chat_tokenizer import ChatTokenizer  # noqa: E402  # needs llama_cpp

pytestmark = pytest.mark.timeout(120)

CLOSERS = {"llama3": ("<|eot_id|>", "<|end_header_id|>"), "smollm2": ("<|im_end|>", "<|im_start|>")}


@pytest.fixture(scope="module", params=["llama3", "smollm2"])
def folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A tokenizer folder as the llama.cpp backend reads it: the real Llama-3 tokenizer (no template:
    the Llama-3 fallback renders), and the embedded SmolLM2 GGUF's, converted as the worker converts it."""
    if request.param == "llama3":
        return "llama3", request.getfixturevalue("llama3_tokenizer_dir")
    try:
        source = resolve_source(EMBEDDED_MODEL_ID)
    except ModelNotAvailable as exc:
        needs.missing(f"the embedded SmolLM2 tokenizer ({exc})", "make install does")
    return "smollm2", tokenizer_folder(source, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def pair(folder: tuple[str, Path]) -> tuple[str, ChatTokenizer, Any]:
    name, path = folder
    return name, ChatTokenizer(path), AutoTokenizer.from_pretrained(path)


def conversations(name: str, hf: Any) -> dict[str, list[ChatMessage]]:
    """Every conversation of test_special_tokens.py, for this tokenizer's control tokens."""
    close, open_ = CLOSERS[name]
    other = "<|im_end|>" if close == "<|eot_id|>" else "<|eot_id|>"
    out = {f"ordinary-{k}": list(v) for k, v in ORDINARY.items()}
    for k, pairs in INJECTIONS.items():
        out[f"injection-{k}"] = [
            ChatMessage(r, c.format(close=close, open=open_, other=other)) for r, c in pairs
        ]
    specials = [t.content for t in hf.added_tokens_decoder.values() if t.special]
    for k, shape in SHAPES.items():
        for token in specials[:40]:  # Llama-3 has 256; the first 40 cover every kind
            content = shape.format(t=token)
            roles = ("system", "user", "assistant", "user")
            out[f"shape-{k}-{token}"] = [ChatMessage(r, content) for r in roles]
    return out


def test_same_ids_as_transformers(pair: tuple[str, ChatTokenizer, Any]) -> None:
    name, ours, hf = pair
    cases = conversations(name, hf)
    differ = [
        k for k, messages in cases.items() if render_prompt(ours, messages) != render_prompt(hf, messages)
    ]
    assert differ == [], f"{len(differ)} of {len(cases)} differ"
    assert len(cases) > 100


def test_vocabulary_and_end_token_agree(pair: tuple[str, ChatTokenizer, Any]) -> None:
    _, ours, hf = pair
    assert ours.get_vocab() == hf.get_vocab()
    assert (ours.eos_token, ours.eos_token_id, ours.bos_token) == (
        hf.eos_token,
        hf.eos_token_id,
        hf.bos_token,
    )
    ids = render_prompt(hf, [ChatMessage("user", "Привет 🚀")])
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False)


def test_loading_it_imports_neither_torch_nor_transformers(folder: tuple[str, Path]) -> None:
    code = (
        "import sys; from model.chat_tokenizer import ChatTokenizer; from model.chat import render_prompt;"
        "from model.types import ChatMessage;"
        f"render_prompt(ChatTokenizer(__import__('pathlib').Path({str(folder[1])!r})), [ChatMessage('user', 'hi')]);"
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
