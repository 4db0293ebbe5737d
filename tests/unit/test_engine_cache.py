"""Each backend's decode loop (KV cache, sampling) agrees with transformers' generate()."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from model.engine import Engine
from model.types import Backend, ChatMessage, Completion, SamplingParams, TextDelta
from tests.tiny_llama import TinyLlamas
from tests.unit.conftest import load_engine

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def random_llama3(tiny_llamas: TinyLlamas) -> tuple[Path, LlamaForCausalLM]:
    """A tiny Llama with random weights: its attention really mixes positions, unlike the scripted one."""
    return tiny_llamas.random()


def test_greedy_tokens_match_transformers_generate(
    random_llama3: tuple[Path, LlamaForCausalLM], backend: Backend, model_cache: Path
) -> None:
    path, reference = random_llama3
    engine: Engine = load_engine(path, model_cache, backend)
    prompt = engine.prepare([ChatMessage("user", "Расскажи про космос кратко.")])
    items = list(engine.stream(prompt, SamplingParams(max_tokens=40, temperature=0.0)))
    done = items[-1]
    assert isinstance(done, Completion)
    text = "".join(i.text for i in items if isinstance(i, TextDelta))

    ids = torch.tensor([prompt.token_ids])
    out = reference.generate(ids, max_new_tokens=done.completion_tokens, do_sample=False, eos_token_id=None)
    new = out[0, ids.shape[1] :].tolist()
    assert done.completion_tokens == len(new)
    expected = engine.loaded.tokenizer.decode(
        [t for t in new if t not in (128001, 128009)], skip_special_tokens=True
    )
    assert text == expected


def greedy_text(engine: Engine, messages: list[ChatMessage]) -> str:
    items = engine.stream(engine.prepare(messages), SamplingParams(max_tokens=24, temperature=0.0))
    return "".join(i.text for i in items if isinstance(i, TextDelta))


def test_greedy_text_does_not_depend_on_what_ran_before(
    random_llama3: tuple[Path, LlamaForCausalLM], backend: Backend, model_cache: Path
) -> None:
    """llama.cpp reuses the KV cache of a prompt prefix shared with the previous request; the text
    must be the same as from an engine that has run nothing."""
    path, _ = random_llama3
    system = ChatMessage("system", "Ты полезный помощник. " * 8)
    first = [system, ChatMessage("user", "Расскажи про космос кратко.")]
    other = [system, ChatMessage("user", "Напиши поэму.")]
    fresh = {
        "first": greedy_text(load_engine(path, model_cache, backend), first),
        "other": greedy_text(load_engine(path, model_cache, backend), other),
    }
    engine = load_engine(path, model_cache, backend)
    follow_up = [*first, ChatMessage("assistant", fresh["first"]), ChatMessage("user", "Ещё.")]
    seen = [greedy_text(engine, m) for m in (first, first, other, first, follow_up)]
    assert seen[:4] == [fresh["first"], fresh["first"], fresh["other"], fresh["first"]]
    assert seen[4] == greedy_text(load_engine(path, model_cache, backend), follow_up)
