"""The sampling surface on both engines: logit_bias, presence/frequency/repetition penalties, top-k,
min-p and logprobs, each checked against a direct computation from the scripted model's own logits
(a plain transformers forward of the same saved weights), plus the exact token bytes logprobs
report and how their entries ride on the text deltas."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders
from tokenizers.models import WordLevel
from transformers import LlamaForCausalLM

from api.serving import structured
from model.engine import Engine
from model.generation import Generation, Output
from model.penalties import penalties_for
from model.scheduler import Scheduler
from model.token_bytes import TokenBytes
from model.types import (
    ChatMessage,
    Completion,
    Prompt,
    SampledLogprobs,
    SamplingParams,
    StepOutput,
    TextDelta,
)
from tests.unit.conftest import Script

pytestmark = pytest.mark.timeout(120)

MESSAGES = [ChatMessage("user", "Ответь в JSON.")]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0)
EOT = 128009
# Off the scripted chain: after it the model's logits are its own (21.9 for " дела", the best).
KOT = 100584  # " кот"
FLAT = 80.0  # a temperature that makes the scripted model's 80-logit margin a coin toss


@pytest.fixture(scope="module")
def reference(llama3_dir: Path) -> LlamaForCausalLM:
    """The same saved weights, run directly: the raw logits each engine's sampling starts from."""
    return LlamaForCausalLM.from_pretrained(llama3_dir, dtype=torch.float32).eval()


def raw_logits(reference: LlamaForCausalLM, ids: Sequence[int]) -> torch.Tensor:
    with torch.no_grad():
        return reference(input_ids=torch.tensor([list(ids)])).logits[0, -1].double()


def adjusted(
    logits: torch.Tensor, sampling: SamplingParams, prompt: Sequence[int], out: Sequence[int]
) -> None:
    """vLLM's order, dense and in place: logit_bias, then repetition, then frequency and presence."""
    for token, bias in sampling.logit_bias:
        if 0 <= token < logits.numel():  # ids outside the vocabulary are ignored
            logits[token] += bias
    if sampling.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt) | set(out)))
        x = logits[seen]
        r = sampling.repetition_penalty
        logits[seen] = torch.where(x > 0, x / r, x * r)
    counts = torch.bincount(torch.tensor(list(out), dtype=torch.long), minlength=logits.numel()).double()
    logits -= sampling.frequency_penalty * counts + sampling.presence_penalty * (counts > 0).double()


def simulate_greedy(
    reference: LlamaForCausalLM, prompt: Sequence[int], sampling: SamplingParams
) -> list[int]:
    out: list[int] = []
    while len(out) < sampling.max_tokens and (not out or out[-1] != EOT):
        logits = raw_logits(reference, [*prompt, *out])
        adjusted(logits, sampling, prompt, out)
        out.append(int(logits.argmax()))
    return out


def generate(
    engine: Engine, sampling: SamplingParams, messages: Sequence[ChatMessage] = MESSAGES
) -> Generation:
    """Run one generation through the engine's scheduler; the Generation holds its tokens."""
    gen = engine.generation(engine.prepare(messages), sampling)
    engine.scheduler.submit("probe", gen)
    while not gen.done:
        engine.scheduler.step()
    return gen


def deltas(engine: Engine, sampling: SamplingParams) -> list[TextDelta]:
    return [e for e in engine.stream(engine.prepare(MESSAGES), sampling) if isinstance(e, TextDelta)]


# --- logit_bias and the penalties, against a dense computation from the raw logits ---------------


def test_logit_bias_minus_100_bans_the_greedy_token(engine: Engine, script: Script) -> None:
    first = script.token_ids[0]
    assert generate(engine, GREEDY).tokens[0] == first
    banned = generate(engine, SamplingParams(max_tokens=16, temperature=0.0, logit_bias=((first, -100.0),)))
    assert first not in banned.tokens


def test_logit_bias_plus_100_makes_greedy_emit_a_token(engine: Engine) -> None:
    gen = generate(engine, SamplingParams(max_tokens=6, temperature=0.0, logit_bias=((KOT, 100.0),)))
    assert gen.tokens == [KOT] * 6


def test_a_logit_bias_outside_the_vocabulary_is_ignored(engine: Engine, script: Script) -> None:
    sampling = SamplingParams(max_tokens=16, temperature=0.0, logit_bias=((10**6, 50.0), (-1, 50.0)))
    assert generate(engine, sampling).tokens == [*script.token_ids, script.end_id]


PENALIZED = {
    # " кот" forced, until 7 per repeat brings its 100 below " дела"'s 21.9 (13 steps in).
    "frequency": (
        SamplingParams(max_tokens=20, frequency_penalty=7.0, logit_bias=((KOT, 100.0),)),
        "Ответь в JSON.",
    ),
    # Once is enough for presence: 100 - 85 < 21.9.
    "presence": (
        SamplingParams(max_tokens=20, presence_penalty=85.0, logit_bias=((KOT, 100.0),)),
        "Ответь в JSON.",
    ),
    # "Пр" is in the prompt, so 80 / 3 loses to the bias of 40; then " кот" itself is seen.
    "repetition": (
        SamplingParams(max_tokens=20, repetition_penalty=3.0, logit_bias=((KOT, 40.0),)),
        "Привет",
    ),
    "all-at-once": (
        SamplingParams(
            max_tokens=20,
            repetition_penalty=1.3,
            frequency_penalty=3.0,
            presence_penalty=10.0,
            logit_bias=((KOT, 100.0), (28089, -30.0)),
        ),
        "Привет",
    ),
}


@pytest.mark.parametrize("case", sorted(PENALIZED))
def test_penalties_change_greedy_exactly_as_computed(
    engine: Engine, reference: LlamaForCausalLM, case: str
) -> None:
    settings, question = PENALIZED[case]
    sampling = SamplingParams(
        max_tokens=20,
        temperature=0.0,
        logit_bias=settings.logit_bias,
        presence_penalty=settings.presence_penalty,
        frequency_penalty=settings.frequency_penalty,
        repetition_penalty=settings.repetition_penalty,
    )
    messages = [ChatMessage("user", question)]
    prompt = engine.prepare(messages).token_ids
    expected = simulate_greedy(reference, prompt, sampling)
    unpenalized = simulate_greedy(
        reference, prompt, SamplingParams(max_tokens=20, logit_bias=sampling.logit_bias)
    )
    assert expected != unpenalized  # the case really exercises its penalty
    assert generate(engine, sampling, messages).tokens == expected


def test_a_resumed_sequence_keeps_its_generated_counts(engine: Engine, reference: LlamaForCausalLM) -> None:
    """A preempted sequence starts again from prompt + its tokens; only those count as generated."""
    sampling = SamplingParams(
        max_tokens=20, temperature=0.0, frequency_penalty=7.0, logit_bias=((KOT, 100.0),)
    )
    prompt = engine.prepare(MESSAGES).token_ids
    tokens = generate(engine, sampling).tokens
    turn = tokens.index(next(t for t in tokens if t != KOT))  # where the penalty first wins
    runner = engine.loaded.runner

    def next_token(generated: int) -> int:
        start = [*prompt, *tokens[:turn]]
        slot = runner.add(start, sampling, len(start) + 8, None, generated=generated)
        try:
            while slot not in (out := runner.step()).tokens:
                pass
            return out.tokens[slot]
        finally:
            runner.drop(slot)

    assert next_token(generated=turn) == tokens[turn]
    assert next_token(generated=0) == KOT  # counts lost: the bias would win again


# A short sequence, and one touching more ids than the bookkeeping's first arrays hold (so they
# grow while the prompt and the biases are taken in).
LONG_PROMPT = [100 + i for i in range(40)]


@pytest.mark.parametrize(
    ("tokens", "generated", "bias"),
    [
        ([5, 7, 7, 9, 11, 11, 11, 5], 4, ((3, 5.0), (11, -2.0), (5000, 9.0))),
        ([*LONG_PROMPT, 7, 7, 101, 300], 4, tuple((200 + i, float(i % 7 - 3)) for i in range(30))),
    ],
    ids=["short", "grows"],
)
def test_penalties_apply_sparsely_as_the_dense_rule(
    tokens: list[int], generated: int, bias: tuple[tuple[int, float], ...]
) -> None:
    rng = np.random.default_rng(0)
    row = rng.normal(0, 3, 1000).astype(np.float32)
    sampling = SamplingParams(
        max_tokens=20, repetition_penalty=1.7, frequency_penalty=0.4, presence_penalty=0.9, logit_bias=bias
    )
    penalties = penalties_for(sampling, tokens, generated, vocab_size=row.size)
    assert penalties is not None
    expected = torch.from_numpy(row.copy()).double()
    split = len(tokens) - generated
    adjusted(expected, sampling, tokens[:split], tokens[split:])
    got = row.copy()
    penalties.apply_to_row(got)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-6, atol=1e-5)
    assert (
        penalties_for(SamplingParams(max_tokens=20), tokens, generated, vocab_size=row.size) is None
    )  # defaults: nothing


# --- top-k and min-p ------------------------------------------------------------------------------


def test_top_k_1_at_a_flat_temperature_is_greedy(engine: Engine, script: Script) -> None:
    greedy = [*script.token_ids, script.end_id]
    flat = SamplingParams(max_tokens=16, temperature=FLAT, top_p=1.0, seed=3)
    assert generate(engine, flat).tokens != greedy  # at this temperature the script is lost at once
    for seed in range(3):
        top1 = SamplingParams(max_tokens=16, temperature=FLAT, top_p=1.0, seed=seed, top_k=1)
        assert generate(engine, top1).tokens == greedy


def test_top_k_minus_1_is_off(engine: Engine) -> None:
    flat = SamplingParams(max_tokens=8, temperature=FLAT, top_p=1.0, seed=5)
    off = SamplingParams(max_tokens=8, temperature=FLAT, top_p=1.0, seed=5, top_k=-1)
    assert generate(engine, flat).tokens == generate(engine, off).tokens


def test_min_p_keeps_only_tokens_near_the_best(engine: Engine, script: Script) -> None:
    # At temperature 80 every other token is exp(-1) = 0.37 as likely as the scripted one.
    kept_alone = SamplingParams(max_tokens=16, temperature=FLAT, top_p=1.0, seed=1, min_p=0.5)
    assert generate(engine, kept_alone).tokens == [*script.token_ids, script.end_id]
    all_kept = SamplingParams(max_tokens=16, temperature=FLAT, top_p=1.0, seed=1, min_p=0.3)
    assert generate(engine, all_kept).tokens != [*script.token_ids, script.end_id]


# --- logprobs -------------------------------------------------------------------------------------

# Three tokens just below the scripted one (80), so the best five are distinct but for the fifth.
RUNNERS_UP = ((KOT, 79.0), (102103, 78.5), (114707, 77.0))


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(max_tokens=16, temperature=0.0, logprobs=True, top_logprobs=5, logit_bias=RUNNERS_UP),
        # Reported at the temperature, before the top-k cut that makes this draw greedy.
        SamplingParams(
            max_tokens=16,
            temperature=2.0,
            top_k=1,
            seed=0,
            logprobs=True,
            top_logprobs=5,
            logit_bias=RUNNERS_UP,
        ),
    ],
    ids=["greedy", "t2-top1"],
)
def test_logprobs_equal_a_direct_log_softmax(
    engine: Engine, reference: LlamaForCausalLM, script: Script, sampling: SamplingParams
) -> None:
    prompt = engine.prepare(MESSAGES).token_ids
    token_bytes = TokenBytes(engine.loaded.tokenizer.backend_tokenizer)
    events = deltas(engine, sampling)
    entries = [e for d in events for e in d.logprobs]
    assert "".join(d.text for d in events) == script.text
    assert len(entries) == len(script.token_ids)  # the end-of-turn token has none
    temperature = 1.0 if sampling.greedy else sampling.temperature
    for i, entry in enumerate(entries):
        logits = raw_logits(reference, [*prompt, *script.token_ids[:i]])
        adjusted(logits, sampling, prompt, script.token_ids[:i])
        expected = torch.log_softmax(logits / temperature, dim=-1)
        token = script.token_ids[i]
        assert entry.bytes == token_bytes(token)[1]
        assert entry.logprob == pytest.approx(float(expected[token]), abs=1e-4)
        values, ids = torch.topk(expected, 5)
        top = entry.top
        assert len(top) == 5
        assert [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True)
        assert entry.logprob <= top[0].logprob + 1e-6
        assert [t.logprob for t in top] == pytest.approx(values.tolist(), abs=1e-4)
        # The fifth is one of many tokens tied at logit 0: only its value is defined.
        assert [t.bytes for t in top[:4]] == [token_bytes(int(t))[1] for t in ids[:4]]


def test_logprobs_ride_on_the_deltas_and_their_bytes_spell_the_text(engine: Engine, script: Script) -> None:
    events = deltas(engine, SamplingParams(max_tokens=16, temperature=0.0, logprobs=True, top_logprobs=0))
    text, raw = "", b""
    for delta in events:
        text += delta.text
        raw += b"".join(e.bytes for e in delta.logprobs)
        assert raw == text.encode("utf-8")  # each entry arrives with the text of its token
        assert all(e.top == () for e in delta.logprobs)
    assert text == script.text
    rocket = next(d for d in events if "🚀" in d.text)
    assert len(rocket.logprobs) == 3  # held until the emoji's three byte-level tokens are in
    assert all("\ufffd" in e.token for e in rocket.logprobs)


def test_no_logprobs_unless_asked(engine: Engine, script: Script) -> None:
    events = deltas(engine, GREEDY)
    assert "".join(d.text for d in events) == script.text
    assert all(d.logprobs == () for d in events)


@pytest.mark.parametrize("temperature", [1.0, FLAT], ids=["t1", "flat"])
def test_logprobs_under_a_grammar_list_only_allowed_tokens(engine: Engine, temperature: float) -> None:
    grammar = structured.grammar_for_schema({"enum": ["Привет", "Пока"]}, "response_format")
    sampling = SamplingParams(
        max_tokens=24, temperature=temperature, seed=0, grammar=grammar, logprobs=True, top_logprobs=5
    )
    events = deltas(engine, sampling)
    assert "".join(d.text for d in events) in ('"Привет"', '"Пока"')
    entries = [e for d in events for e in d.logprobs]
    # Allowed tokens have logits of 0 or 80 here: a forbidden one (-1e30, whatever the
    # temperature does to it) is never drawn nor listed.
    assert entries and all(-1000 < e.logprob <= 0.0 for e in entries)
    assert all(0 < len(e.top) <= 5 and all(t.logprob > -1000 for t in e.top) for e in entries)


# --- how entries travel with a Generation's text ----------------------------------------------------


def fed(tokenizer: Any, tokens: Sequence[int], sampling: SamplingParams) -> list[Output]:
    gen = Generation(
        Prompt((1, 2)), sampling, tokenizer=tokenizer, stop_ids=frozenset({EOT}), context_length=1000
    )
    out: list[Output] = []
    for i, token in enumerate(tokens):
        out += gen.feed(token, (-0.1 * i, ()))
        if gen.done:
            return out
    return out + gen.finish("length")


@pytest.mark.parametrize(
    ("stop", "text", "kept"),
    [
        ("ир", "Привет, м", 5),  # cut inside " мир": the token's text starts before the cut
        (" мир", "Привет,", 4),  # cut where " мир" starts: its entry goes with its text
        (", м", "Привет", 3),  # "," was held back as a possible stop, then cut
    ],
)
def test_a_stop_string_drops_the_entries_of_what_it_cut(
    llama3_tokenizer: Any, script: Script, stop: str, text: str, kept: int
) -> None:
    out = fed(llama3_tokenizer, script.token_ids, SamplingParams(max_tokens=100, stop=(stop,), logprobs=True))
    got = [o for o in out if isinstance(o, TextDelta)]
    assert "".join(d.text for d in got) == text
    entries = [e for d in got for e in d.logprobs]
    assert [e.logprob for e in entries] == pytest.approx([-0.1 * i for i in range(kept)])
    assert b"".join(e.bytes for e in entries).startswith(text.encode())


def test_entries_of_held_bytes_go_out_with_an_empty_tail(llama3_tokenizer: Any, script: Script) -> None:
    # Cut by max_tokens after the rocket's first byte-level token: no text to go with its entry.
    out = fed(llama3_tokenizer, script.token_ids[:7], SamplingParams(max_tokens=100, logprobs=True))
    *_, tail, end = out
    assert isinstance(tail, TextDelta) and tail.text == "" and len(tail.logprobs) == 1
    assert isinstance(end, Completion)
    entries = [e for o in out if isinstance(o, TextDelta) for e in o.logprobs]
    assert len(entries) == 7


class _PreemptsOnce:
    """A one-slot runner that puts its sequence out at the third step, then goes on."""

    capacity = 1

    TOKENS = (54745, 28089, 8341)  # "Пр" "ив" "ет"

    def __init__(self) -> None:
        self.added: list[tuple[tuple[int, ...], int]] = []
        self.steps = 0
        self.emitted = 0

    def can_admit(self, positions: int) -> bool:
        return True

    def add(
        self,
        prompt: Sequence[int],
        sampling: SamplingParams,
        positions: int,
        constraint: Any = None,
        generated: int = 0,
    ) -> int:
        self.added.append((tuple(prompt), generated))
        return 0

    def step(self) -> StepOutput:
        self.steps += 1
        out = StepOutput()
        if self.steps == 3:
            out.preempted.add(0)
            return out
        token = self.TOKENS[self.emitted]
        self.emitted += 1
        logprob: SampledLogprobs = (-0.5, ((token, -0.5), (KOT, -1.5)))
        out.tokens[0], out.logprobs[0] = token, logprob
        return out

    def drop(self, slot: int) -> None:
        pass


def test_the_scheduler_resumes_with_the_generated_count_and_passes_logprobs(llama3_tokenizer: Any) -> None:
    runner = _PreemptsOnce()
    scheduler = Scheduler(runner)
    sampling = SamplingParams(max_tokens=3, logprobs=True, top_logprobs=2)
    gen = Generation(
        Prompt((1, 2)), sampling, tokenizer=llama3_tokenizer, stop_ids=frozenset({EOT}), context_length=100
    )
    scheduler.submit("one", gen)
    seen: list[tuple[Hashable, object]] = []
    while not gen.done:
        seen += scheduler.step()
    assert runner.added == [((1, 2), 0), ((1, 2, 54745, 28089), 2)]
    got = [e for _, d in seen if isinstance(d, TextDelta) for e in d.logprobs]
    assert "".join(e.token for e in got) == "Привет"
    assert [t.token for t in got[0].top] == ["Пр", " кот"]


# --- token bytes ------------------------------------------------------------------------------------


def test_token_bytes_invert_byte_level_bpe(llama3_tokenizer: Any) -> None:
    word = "ПОДЪЕЗД"  # "Ъ" is two byte-level tokens here, one byte each
    ids = llama3_tokenizer.encode(word, add_special_tokens=False)
    token_bytes = TokenBytes(llama3_tokenizer.backend_tokenizer)
    pieces = [token_bytes(i) for i in ids]
    assert b"".join(raw for _, raw in pieces) == word.encode("utf-8")
    halves = [(text, raw) for text, raw in pieces if len(raw) == 1]
    assert halves == [("\ufffd", b"\xd0"), ("\ufffd", b"\xaa")]
    assert token_bytes(EOT) == ("<|eot_id|>", b"<|eot_id|>")  # an added token is its literal text


def test_token_bytes_of_a_sentencepiece_vocabulary() -> None:
    vocab = {"<unk>": 0, "<0xD0>": 1, "<0xAA>": 2, "\u2581мир": 3}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    token_bytes = TokenBytes(tokenizer)
    assert [token_bytes(i)[1] for i in (1, 2, 3)] == [b"\xd0", b"\xaa", " мир".encode()]
