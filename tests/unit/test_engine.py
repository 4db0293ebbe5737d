"""Engine end to end on a tiny scripted Llama with the real Llama-3 tokenizer and chat format, on each
backend (the `engine` fixture is parametrized over transformers and llama.cpp)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import pytest

from model.chat import end_of_turn_ids
from model.engine import Engine
from model.types import (
    ChatMessage,
    Completion,
    ContextLengthExceeded,
    Prompt,
    SamplingParams,
    TextDelta,
)

if TYPE_CHECKING:
    from conftest import Script

pytestmark = pytest.mark.timeout(60)

# What the session's scripted model (conftest.py) was built to say, and its max_position_embeddings.
SCRIPT = "Привет, мир! 🚀 Как дела?"
CONTEXT_LENGTH = 256

GREEDY = SamplingParams(max_tokens=64, temperature=0.0)
MESSAGES = (ChatMessage("system", "You are terse."), ChatMessage("user", "Say hi."))
H = "<|start_header_id|>{}<|end_header_id|>\n\n"
ASSISTANT = H.format("assistant")

# Text released after each number of scripted tokens: 'Пр' 'ив' 'ет' ',' ' мир' '!' then the rocket
# in three byte-level tokens (held until complete, space included), ' Как' ' дела' '?'.
PREFIX_AFTER = {
    0: "",
    1: "Пр",
    2: "Прив",
    3: "Привет",
    4: "Привет,",
    5: "Привет, мир",
    6: "Привет, мир!",
    7: "Привет, мир!",
    8: "Привет, мир!",
    9: "Привет, мир! 🚀",
    10: "Привет, мир! 🚀 Как",
    11: "Привет, мир! 🚀 Как дела",
    12: SCRIPT,
}


def run(
    engine: Engine,
    prompt: Prompt,
    sampling: SamplingParams,
    should_stop: Callable[[], bool] = lambda: False,
) -> tuple[list[str], Completion]:
    """Deltas and the final Completion, checking the stream's shape on the way."""
    items = list(engine.stream(prompt, sampling, should_stop))
    *deltas, last = items
    assert isinstance(last, Completion)
    assert all(isinstance(d, TextDelta) and d.text for d in deltas)
    return [d.text for d in deltas if isinstance(d, TextDelta)], last


def decoded_prompt(engine: Engine, messages: Sequence[ChatMessage]) -> str:
    ids = engine.prepare(messages).token_ids
    return str(engine.loaded.tokenizer.decode(list(ids), skip_special_tokens=False))


def test_the_tables_here_describe_the_session_model(engine: Engine, script: Script) -> None:
    assert script.text == SCRIPT
    assert len(script.token_ids) == max(PREFIX_AFTER)
    assert engine.context_length == CONTEXT_LENGTH


# MESSAGES as the Llama-3 template renders it.
TERSE = (
    "<|begin_of_text|>"
    + H.format("system")
    + "You are terse.<|eot_id|>"
    + H.format("user")
    + "Say hi.<|eot_id|>"
    + ASSISTANT
)


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        pytest.param(MESSAGES, TERSE, id="system-user"),
        pytest.param(
            (ChatMessage("developer", "You are terse."), ChatMessage("user", "Say hi.")),
            TERSE,
            id="developer-renders-as-system",
        ),
        pytest.param(
            (ChatMessage("user", "Привет 🚀"),),
            "<|begin_of_text|>" + H.format("user") + "Привет 🚀<|eot_id|>" + ASSISTANT,
            id="user-only-unicode",
        ),
        pytest.param(
            (ChatMessage("user", "  padded \n\n"),),
            "<|begin_of_text|>" + H.format("user") + "padded<|eot_id|>" + ASSISTANT,
            id="content-trimmed",
        ),
        pytest.param(
            (ChatMessage("user", "a"), ChatMessage("assistant", "b"), ChatMessage("user", "c")),
            "<|begin_of_text|>"
            + H.format("user")
            + "a<|eot_id|>"
            + H.format("assistant")
            + "b<|eot_id|>"
            + H.format("user")
            + "c<|eot_id|>"
            + ASSISTANT,
            id="multi-turn",
        ),
    ],
)
def test_prompt_renders_llama3_format_with_one_bos(
    engine: Engine, messages: Sequence[ChatMessage], expected: str
) -> None:
    assert engine.loaded.tokenizer.chat_template is None  # the built-in Llama-3 template is in use
    text = decoded_prompt(engine, messages)
    assert text == expected
    assert text.count("<|begin_of_text|>") == 1


def test_stop_ids_cover_eot_and_end_of_text(engine: Engine) -> None:
    ids = end_of_turn_ids(engine.loaded.tokenizer, engine.loaded.eos_token_ids)
    assert {128001, 128009} <= ids


def test_greedy_stream_reproduces_script_and_counts_eot_as_completion_token(
    engine: Engine, script: Script
) -> None:
    prompt = engine.prepare(MESSAGES)
    deltas, done = run(engine, prompt, GREEDY)
    assert "".join(deltas) == SCRIPT
    assert [d for d in deltas if "\ufffd" in d] == []
    # The three rocket tokens come out as one delta, together with the space of the first one.
    assert deltas == ["Пр", "ив", "ет", ",", " мир", "!", " 🚀", " Как", " дела", "?"]
    # The end-of-turn token is sampled, so it counts as generated, though it yields no text.
    assert done == Completion("stop", len(prompt.token_ids), len(script.token_ids) + 1)


@pytest.mark.parametrize("end_token", ["<|end_of_text|>", "<|eom_id|>"])
def test_other_end_tokens_also_finish_with_stop(
    scripted_engine: Callable[..., tuple[Engine, Script]], end_token: str
) -> None:
    variant, script = scripted_engine("Hi there!", end_token)
    prompt = variant.prepare(MESSAGES)
    deltas, done = run(variant, prompt, GREEDY)
    assert "".join(deltas) == "Hi there!"
    assert done == Completion("stop", len(prompt.token_ids), len(script.token_ids) + 1)


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 5, 6, 7, 8, 9, 11, 12])
def test_max_tokens_below_script_finishes_with_length(engine: Engine, max_tokens: int) -> None:
    """A budget that ends mid-emoji drops the incomplete bytes rather than emit a broken character."""
    prompt = engine.prepare(MESSAGES)
    deltas, done = run(engine, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    assert "".join(deltas) == PREFIX_AFTER[max_tokens]
    assert done == Completion("length", len(prompt.token_ids), max_tokens)


@pytest.mark.parametrize(
    ("stop", "text", "completion_tokens"),
    [
        pytest.param(("вет",), "При", 3, id="two-tokens"),
        pytest.param((", м",), "Привет", 5, id="three-tokens"),
        pytest.param(("! 🚀",), "Привет, мир", 9, id="into-emoji-bytes"),
        pytest.param(("🚀 Как",), "Привет, мир! ", 10, id="out-of-emoji-bytes"),
        pytest.param(("дела?",), "Привет, мир! 🚀 Как ", 12, id="at-the-end"),
        pytest.param(("?",), "Привет, мир! 🚀 Как дела", 12, id="last-token"),
        pytest.param(("Привет",), "", 3, id="at-the-very-start"),
        pytest.param(("П",), "", 1, id="first-character"),
        pytest.param(("xyz", "мир", "ет"), "Прив", 3, id="multi-earliest-wins"),
        pytest.param(("мир", ", "), "Привет", 5, id="multi-same-step-earliest-start"),
        pytest.param(("ир", "ривет"), "П", 3, id="multi-first-completed"),
        pytest.param(("", "вет"), "При", 3, id="empty-stop-ignored"),
        pytest.param(("мирок",), SCRIPT, 13, id="prefix-seen-then-released"),
        pytest.param(("дела?!",), SCRIPT, 13, id="held-tail-flushed-at-eot"),
        pytest.param(("xyz",), SCRIPT, 13, id="never-matches"),
    ],
)
def test_stop_strings_across_token_boundaries(
    engine: Engine, stop: tuple[str, ...], text: str, completion_tokens: int
) -> None:
    prompt = engine.prepare(MESSAGES)
    deltas, done = run(engine, prompt, SamplingParams(max_tokens=64, temperature=0.0, stop=stop))
    # Deltas only ever append, so equality with the text before the stop means nothing was emitted
    # and then taken back.
    assert "".join(deltas) == text
    assert [d for d in deltas if any(s and s in d for s in stop)] == []
    assert done == Completion("stop", len(prompt.token_ids), completion_tokens)


def test_seeded_sampling_at_temperature_one_is_repeatable(engine: Engine) -> None:
    prompt = engine.prepare(MESSAGES)
    sampling = SamplingParams(max_tokens=64, temperature=1.0, top_p=1.0, seed=7)
    first, second = run(engine, prompt, sampling), run(engine, prompt, sampling)
    assert first == second
    # The scripted logit margin (80) leaves the script the only plausible sample.
    assert "".join(first[0]) == SCRIPT


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_seed_decides_a_flat_distribution(engine: Engine, top_p: float) -> None:
    """At a temperature that flattens the scripted logits to near-uniform, the seed alone picks the tokens."""
    prompt = engine.prepare(MESSAGES)

    def sampled(seed: int) -> tuple[list[str], Completion]:
        return run(engine, prompt, SamplingParams(max_tokens=16, temperature=80.0, top_p=top_p, seed=seed))

    first, again, other = sampled(7), sampled(7), sampled(8)
    assert first == again
    assert first[0] != other[0]
    assert "".join(first[0]) != SCRIPT


def cancel_after(calls: int) -> Callable[[], bool]:
    """A should_stop that answers False `calls` times, then True."""
    seen = 0

    def should_stop() -> bool:
        nonlocal seen
        seen += 1
        return seen > calls

    return should_stop


@pytest.mark.parametrize("calls", [0, 1, 3, 5, 12])
def test_should_stop_cancels_after_that_many_tokens(engine: Engine, calls: int) -> None:
    prompt = engine.prepare(MESSAGES)
    deltas, done = run(engine, prompt, GREEDY, cancel_after(calls))
    assert "".join(deltas) == PREFIX_AFTER[calls]
    assert done == Completion("cancelled", len(prompt.token_ids), calls)


def test_should_stop_never_true_before_script_ends_finishes_with_stop(engine: Engine, script: Script) -> None:
    deltas, done = run(engine, engine.prepare(MESSAGES), GREEDY, cancel_after(len(script.token_ids) + 1))
    assert "".join(deltas) == SCRIPT
    assert done.finish_reason == "stop"


def user_message_of_length(engine: Engine, prompt_tokens: int) -> ChatMessage:
    """A user message whose rendered prompt is exactly `prompt_tokens` tokens (" a" is one token)."""
    overhead = len(engine.prepare([ChatMessage("user", "a")]).token_ids) - 1
    return ChatMessage("user", "a" + " a" * (prompt_tokens - overhead - 1))


@pytest.mark.parametrize("prompt_tokens", [CONTEXT_LENGTH, CONTEXT_LENGTH + 1, 2 * CONTEXT_LENGTH])
def test_prompt_that_fills_the_context_is_refused(engine: Engine, prompt_tokens: int) -> None:
    with pytest.raises(ContextLengthExceeded) as caught:
        engine.prepare([user_message_of_length(engine, prompt_tokens)])
    assert (caught.value.prompt_tokens, caught.value.context_length) == (prompt_tokens, CONTEXT_LENGTH)


def test_truncation_drops_the_oldest_turns_until_the_prompt_fits(engine: Engine) -> None:
    """A Responses request's truncation: "auto": the system turn and the newest turns stay."""
    long = user_message_of_length(engine, CONTEXT_LENGTH // 2 + 10)
    chain = [
        MESSAGES[0],
        long,
        ChatMessage("assistant", "Hi."),
        long,
        ChatMessage("assistant", "Hi."),
        MESSAGES[1],
    ]
    with pytest.raises(ContextLengthExceeded):
        engine.prepare(chain)
    kept = engine.prepare(chain, truncate=True)
    assert kept == engine.prepare([MESSAGES[0], *chain[2:]])  # one long turn fits, two do not
    assert len(kept.token_ids) < CONTEXT_LENGTH
    with pytest.raises(ContextLengthExceeded):  # nothing to drop: the last turn alone is too long
        engine.prepare([MESSAGES[0], user_message_of_length(engine, CONTEXT_LENGTH + 1)], truncate=True)


def test_prompt_one_short_of_the_context_gets_one_token(engine: Engine) -> None:
    prompt = engine.prepare([user_message_of_length(engine, CONTEXT_LENGTH - 1)])
    assert len(prompt.token_ids) == CONTEXT_LENGTH - 1
    deltas, done = run(engine, prompt, GREEDY)
    assert "".join(deltas) == PREFIX_AFTER[1]
    assert done == Completion("length", CONTEXT_LENGTH - 1, 1)


def test_warm_up_runs_and_leaves_generation_unchanged(engine: Engine) -> None:
    engine.warm_up()
    deltas, done = run(engine, engine.prepare(MESSAGES), GREEDY)
    assert "".join(deltas) == SCRIPT
    assert done.finish_reason == "stop"


@pytest.mark.parametrize("temperature", [5e-324, 1e-9, 0.0])
def test_vanishing_temperature_is_greedy(engine: Engine, temperature: float) -> None:
    """Found by the schema fuzzer: a denormal temperature must not overflow the sampler."""
    prompt = engine.prepare([ChatMessage("user", "Hi")])
    items = list(engine.stream(prompt, SamplingParams(max_tokens=4, temperature=temperature, seed=1)))
    greedy = list(engine.stream(prompt, SamplingParams(max_tokens=4, temperature=0.0)))
    assert items == greedy
