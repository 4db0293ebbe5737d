"""The issue's workload: one short user message, 128 new tokens with EOS suppressed, greedy."""

from __future__ import annotations

from typing import Any

from model.types import ChatMessage, SamplingParams

# The issue asks for about 26 prompt tokens; SmolLM2's template adds a 29-token default system
# prompt, so the shortest real request is 31: this one is 34 (the run records the exact count).
PROMPT = "Write a poem."
NEW_TOKENS = 128


def messages() -> list[ChatMessage]:
    return [ChatMessage("user", PROMPT)]


def sampling() -> SamplingParams:
    return SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)


def request_body(model: str | None = None) -> dict[str, Any]:
    """The streamed chat completion every HTTP system gets (`ignore_eos` is vLLM's extension)."""
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": NEW_TOKENS,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    if model is not None:
        body["model"] = model
    return body
