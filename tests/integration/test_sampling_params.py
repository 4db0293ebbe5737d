"""The sampling surface through the SDK on the embedded SmolLM2: `n` choices (blocking and
streamed), logprobs (blocking and streamed, in OpenAI's shape), logit_bias, penalties, vLLM's
top_k / min_p / repetition_penalty extensions, and the 400s naming each parameter."""

from __future__ import annotations

import math
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import Stack

RUSSIAN = [{"role": "user", "content": "Напиши одно предложение о Москве."}]


def test_n_choices_blocking_are_distinct_and_counted(client: openai.OpenAI, model_name: str) -> None:
    one = client.chat.completions.create(
        model=model_name, messages=RUSSIAN, max_tokens=24, temperature=1.0, seed=7
    )
    three = client.chat.completions.create(
        model=model_name, messages=RUSSIAN, max_tokens=24, temperature=1.0, seed=7, n=3
    )
    assert [c.index for c in three.choices] == [0, 1, 2]
    texts = [c.message.content for c in three.choices]
    assert all(texts) and len(set(texts)) == 3, texts  # seeds 7, 8, 9: three different samples
    assert texts[0] == one.choices[0].message.content, "choice 0 is the n=1 answer for the seed"
    assert three.usage is not None and one.usage is not None
    assert three.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once
    assert three.usage.completion_tokens > one.usage.completion_tokens


def test_n_choices_streamed_carry_their_index(client: openai.OpenAI, model_name: str) -> None:
    ask: dict[str, Any] = dict(
        model=model_name, messages=RUSSIAN, max_tokens=24, temperature=1.0, seed=3, n=2
    )
    blocking = client.chat.completions.create(**ask)
    texts, finishes = ["", ""], [None, None]
    for chunk in client.chat.completions.create(**ask, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert texts == [c.message.content for c in blocking.choices]
    assert finishes == [c.finish_reason for c in blocking.choices]


def test_logprobs_blocking_in_openai_shape(client: openai.OpenAI, model_name: str) -> None:
    completion = client.chat.completions.create(
        model=model_name, messages=RUSSIAN, max_tokens=16, temperature=0, logprobs=True, top_logprobs=3
    )
    choice = completion.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    entries = choice.logprobs.content
    assert completion.usage is not None
    # One entry per generated token but the end-of-turn token, which has no text.
    assert len(entries) in (completion.usage.completion_tokens, completion.usage.completion_tokens - 1)
    assert b"".join(bytes(e.bytes or []) for e in entries).decode() == choice.message.content
    for entry in entries:
        assert len(entry.top_logprobs) == 3
        top = [t.logprob for t in entry.top_logprobs]
        assert top == sorted(top, reverse=True) and all(t <= 0 for t in top)
        assert sum(math.exp(t) for t in top) <= 1 + 1e-4
        # Greedy: the token taken is the likeliest.
        assert entry.token == entry.top_logprobs[0].token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)


def test_logprobs_streamed_equal_the_blocking_ones(client: openai.OpenAI, model_name: str) -> None:
    ask: dict[str, Any] = dict(
        model=model_name, messages=RUSSIAN, max_tokens=16, temperature=0, logprobs=True, top_logprobs=2
    )
    blocking = client.chat.completions.create(**ask).choices[0].logprobs
    assert blocking is not None and blocking.content
    streamed = []
    for chunk in client.chat.completions.create(**ask, stream=True):
        for choice in chunk.choices:
            if choice.logprobs is not None:
                streamed += choice.logprobs.content or []
    assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in blocking.content]
    for got, want in zip(streamed, blocking.content, strict=True):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-4)


def test_logit_bias_plus_100_forces_a_token(client: openai.OpenAI, model_name: str) -> None:
    completion = client.chat.completions.create(
        model=model_name, messages=RUSSIAN, max_tokens=5, temperature=0, logprobs=True,
        logit_bias={"1000": 100},
    )  # fmt: skip
    choice = completion.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    tokens = {e.token for e in choice.logprobs.content}
    assert len(tokens) == 1 and len(choice.logprobs.content) == 5, tokens
    assert choice.message.content == choice.logprobs.content[0].token * 5


def test_frequency_penalty_breaks_a_repetition(client: openai.OpenAI, model_name: str) -> None:
    ask: Any = [{"role": "user", "content": "Write the word 'cat' twenty times, separated by spaces."}]
    plain = client.chat.completions.create(model=model_name, messages=ask, max_tokens=30, temperature=0)
    penalized = client.chat.completions.create(
        model=model_name,
        messages=ask,
        max_tokens=30,
        temperature=0,
        frequency_penalty=2.0,
        presence_penalty=1.0,
    )
    plain_text, penalized_text = (
        plain.choices[0].message.content or "",
        penalized.choices[0].message.content or "",
    )
    assert plain_text.lower().count("cat") > penalized_text.lower().count("cat"), (plain_text, penalized_text)


def test_vllm_extensions_are_accepted(stack: Stack, model_name: str) -> None:
    body = {
        "model": model_name, "messages": RUSSIAN, "max_tokens": 8, "temperature": 0.8, "seed": 1,
        "top_k": 1, "min_p": 0.05, "repetition_penalty": 1.2,
    }  # fmt: skip
    greedy = {**body, "temperature": 0, "top_k": -1, "min_p": 0.0}
    r = httpx.post(f"{stack.api_url}/v1/chat/completions", json=body, timeout=60)
    g = httpx.post(f"{stack.api_url}/v1/chat/completions", json=greedy, timeout=60)
    assert r.status_code == 200 and g.status_code == 200, (r.text, g.text)
    # top_k=1 keeps only the likeliest token: sampling at any temperature is greedy.
    assert r.json()["choices"][0]["message"]["content"] == g.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"n": 9}, "n"),
        ({"n": 0}, "n"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"logit_bias": {"cat": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),  # beyond the vocabulary: the worker says so
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
    ],
)
def test_bad_sampling_parameters_are_400(
    stack: Stack, model_name: str, change: dict[str, Any], param: str
) -> None:
    body = {"model": model_name, "messages": RUSSIAN, "max_tokens": 2, **change}
    r = httpx.post(f"{stack.api_url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text
