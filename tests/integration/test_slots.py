"""A worker with 4 slots, with real processes: jobs share one decode loop, and every fault (kill -9,
SIGTERM, a cancel, a prompt that does not fit) ends only the jobs it concerns, each exactly once.
The bounds are the ones README's "Failure behaviour" documents; they detect hangs, they do not
measure speed."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tasks import events
from tests.integration.conftest import Preset, Stack, ready_workers, restart_worker, stack_fixture
from tests.integration.helpers import (
    LONG_PROMPT,
    job_events,
    long_chat,
    record,
    sdk,
    start_long_response,
    wait_for,
    wait_records,
)
from tests.tiny_llama import TinyLlamas, gguf_for_worker

pytestmark = pytest.mark.timeout(300)

SLOTS = 4

slots = stack_fixture(Preset.slots(SLOTS).faults())


def start_long_jobs(stack: Stack, n: int, **body: Any) -> list[str]:
    client = sdk(stack)
    return [start_long_response(client, input=f"{LONG_PROMPT} ({i})", **body) for i in range(n)]


def wait_all_generating(stack: Stack, job_ids: list[str], timeout: float = 60) -> None:
    wait_for(
        lambda: all(any(isinstance(e, events.Delta) for e in job_events(stack, j)) for j in job_ids),
        timeout,
        "every job to be generating",
    )


def worker_description(stack: Stack) -> dict[str, Any]:
    workers = httpx.get(f"{stack.api_url}/health", timeout=5).json()["workers"]
    assert len(workers) == 1
    return dict(workers[0])


def test_health_and_metrics_show_slots_and_busy_ones(slots: Stack) -> None:
    assert worker_description(slots)["slots"] == SLOTS
    job_ids = start_long_jobs(slots, 3)
    try:
        wait_all_generating(slots, job_ids)
        deadline = time.monotonic() + 15  # the heartbeat refreshes the description every 5 s
        while worker_description(slots)["running"] != 3 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert worker_description(slots)["running"] == 3
        text = httpx.get(f"{slots.api_url}/metrics", timeout=5).text
        assert 'vllm:num_requests_running{model_name="SmolLM2-135M-Instruct"} 3.0' in text
        assert "llmq_slots 4.0" in text
    finally:
        for job_id in job_ids:
            sdk(slots).responses.cancel(job_id)
    wait_records(slots, job_ids)
    text = httpx.get(f"{slots.api_url}/metrics", timeout=5).text
    # Steps of 3 sequences were counted (bucket le="4"), after the loop's periodic flush.
    assert "llmq_sequences_per_step_bucket" in text


Token = tuple[str, float, float]  # a generated token, its logprob, and its lead over the runner-up


def greedy_stream(
    stack: Stack, content: str, cancel_after: int | None = None
) -> tuple[list[Token], str | None]:
    """Stream a greedy chat completion; stop reading (the API then cancels it) after that many chunks."""
    body = long_chat(48, messages=[{"role": "user", "content": content}], logprobs=True, top_logprobs=2)
    tokens: list[Token] = []
    finish = None
    with httpx.stream("POST", f"{stack.api_url}/v1/chat/completions", json=body, timeout=120) as r:
        for i, line in enumerate(r.iter_lines()):
            if cancel_after is not None and i >= cancel_after:
                return tokens, "abandoned"
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "choices" in chunk, chunk  # else an in-band error: say which
            choice = chunk["choices"]
            if choice:
                for entry in (choice[0].get("logprobs") or {}).get("content") or []:
                    best, second = entry["top_logprobs"]
                    tokens.append((entry["token"], entry["logprob"], best["logprob"] - second["logprob"]))
                finish = choice[0]["finish_reason"] or finish
    return tokens, finish


def four_with_one_abandoned(
    stack: Stack,
) -> tuple[list[tuple[list[Token], str | None]], list[tuple[list[Token], str | None]]]:
    """The same 4 greedy prompts twice at once on one worker: all to the end, then with the
    first client gone after a few chunks (the API cancels its job mid-generation)."""
    prompts = [f"Write a short story about the number {n}." for n in range(4)]
    with ThreadPoolExecutor(4) as pool:
        reference = list(pool.map(lambda p: greedy_stream(stack, p), prompts))
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(greedy_stream, stack, p, 6 if i == 0 else None) for i, p in enumerate(prompts)]
        results = [f.result() for f in futures]
    return reference, results


def shared_prefill_tokens(stack: Stack) -> float:
    text = httpx.get(f"{stack.api_url}/metrics", timeout=5).text
    [line] = [x for x in text.splitlines() if x.startswith("llmq_shared_prefill_tokens_total{")]
    return float(line.rsplit(" ", 1)[1])


def test_n_choices_share_one_prefill(slots: Stack) -> None:
    # That a shared prefill changes no choice's tokens is tested on F32 models in
    # tests/unit/test_shared_prefill.py; here, that the worker does share, and says so.
    client = sdk(slots)
    ask: Any = [{"role": "user", "content": "Назови три города России и коротко опиши каждый."}]
    before = shared_prefill_tokens(slots)
    together = client.chat.completions.create(
        messages=ask, model="SmolLM2-135M-Instruct", max_tokens=12, temperature=0.9, seed=40, n=3
    )
    assert len({c.message.content for c in together.choices}) == 3
    assert together.usage is not None
    expected = 2 * (together.usage.prompt_tokens - 1)  # two choices took the first's prompt KV
    deadline = time.monotonic() + 10  # a worker adds to the metrics every 2 s
    while shared_prefill_tokens(slots) - before < expected and time.monotonic() < deadline:
        time.sleep(0.2)
    assert shared_prefill_tokens(slots) - before == expected


def test_cancelling_one_of_four_lets_the_others_finish(slots: Stack) -> None:
    reference, results = four_with_one_abandoned(slots)
    assert results[0][1] == "abandoned"
    assert [finish for _, finish in results[1:]] == ["length"] * 3
    # Not asserted equal to `reference` here: on the embedded Q4_1 model llama.cpp's quantized
    # kernels round differently with the batch's size and make-up, so a greedy near-tie can go
    # another way (README, "Determinism"); the F32 model below shows the exact property.
    assert all(tokens for tokens, _ in results[1:])


@pytest.fixture(scope="module")
def f32_slots(
    tmp_path_factory: pytest.TempPathFactory, tiny_llamas: TinyLlamas, model_cache: Path
) -> Iterator[Stack]:
    """A 4-slot worker on a tiny random-weight Llama exported to an F32 GGUF, with the real
    Llama-3 tokenizer: its kernels round a sequence's logits alike whatever it is batched with,
    so only where its cells lie in the unified KV pool moves them, by float noise."""
    model_dir, _ = tiny_llamas.random(context_length=1024)
    f32 = Preset.slots(SLOTS).with_(
        MODEL_ID=str(gguf_for_worker(model_dir, model_cache)),
        MODEL_CACHE_DIR=str(model_cache),
        SERVED_MODEL_NAME="tiny-f32",
    )
    with f32.named("f32-slots").running(tmp_path_factory) as stack:
        yield stack


def test_cancelling_one_of_four_leaves_the_others_as_they_would_have_been_up_to_a_tie(
    f32_slots: Stack,
) -> None:
    reference, results = four_with_one_abandoned(f32_slots)
    assert [finish for _, finish in reference] == ["length"] * 4
    assert results[0][1] == "abandoned"
    assert [finish for _, finish in results[1:]] == ["length"] * 3
    for (got, _), (want, _) in zip(results[1:], reference[1:], strict=True):
        assert len(got) == len(want) == 48
        # Equal token for token, up to a tie. The KV pool is one unified stream, so attention
        # sums a sequence's cells in an order that depends on where the other sequences' tokens
        # lie, which the cancelled job changes: the logprobs then differ in the float noise
        # (measured up to 2e-4 nats on this model), and where the two likeliest tokens are that
        # close the pick may go the other way and the texts part from there. A lost or
        # overwritten cell would move the logprobs by far more than the bound.
        same = next((i for i, (g, w) in enumerate(zip(got, want, strict=True)) if g[0] != w[0]), len(want))
        assert all(abs(g[1] - w[1]) < 1e-3 for g, w in zip(got[:same], want[:same], strict=True))
        assert same == len(want) or want[same][2] < 1e-3, (same, got[same], want[same])


def test_a_prompt_too_long_fails_alone_while_others_run(slots: Stack) -> None:
    client = sdk(slots)
    running = start_long_jobs(slots, 2)
    wait_all_generating(slots, running)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "word " * 9000}]
        )
    assert caught.value.body["code"] == "context_length_exceeded"  # type: ignore[index]
    assert [record(slots, j)["status"] for j in running] == ["in_progress", "in_progress"]
    answer = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert answer.choices[0].finish_reason in ("stop", "length")
    for job_id in running:
        client.responses.cancel(job_id)
    assert [r["status"] for r in wait_records(slots, running)] == ["cancelled", "cancelled"]


def test_a_freed_slot_takes_a_queued_job_at_once(slots: Stack) -> None:
    client = sdk(slots)
    running = start_long_jobs(slots, SLOTS)
    wait_all_generating(slots, running)
    queued = client.responses.create(input="Hi", temperature=0, max_output_tokens=4, background=True)
    time.sleep(1)
    assert record(slots, queued.id)["status"] == "queued"  # every slot is busy
    cancelled_at = time.time()
    client.responses.cancel(running[0])
    done = wait_records(slots, [queued.id])[0]
    assert done["status"] in ("completed", "incomplete")
    # Claimed well within a second of the cancel (the cancel poll is 0.1 s, then Celery's fetch).
    assert float(done["started_at"]) - cancelled_at < 2.0
    for job_id in running[1:]:
        client.responses.cancel(job_id)
    wait_records(slots, running)


def test_sigterm_with_four_running_ends_each_with_its_text(slots: Stack) -> None:
    job_ids = start_long_jobs(slots, SLOTS)
    wait_all_generating(slots, job_ids)
    stopped_at = time.monotonic()
    slots.worker.proc.send_signal(signal.SIGTERM)
    records = wait_records(slots, job_ids)
    took = time.monotonic() - stopped_at
    assert [(r["status"], r.get("error_code")) for r in records] == [("failed", "worker_shutdown")] * SLOTS
    assert took < 2 + 5, took  # grace 2 s, then stopped between tokens
    client = sdk(slots)
    assert all(client.responses.retrieve(j).output_text for j in job_ids)
    assert all(sum(events.is_terminal(e) for e in job_events(slots, j)) == 1 for j in job_ids)
    slots.worker.proc.wait(30)  # the worker exits once its jobs have ended
    slots.worker.stop()
    restart_worker(slots)


def test_kill_9_with_four_running_loses_all_four_once_and_none_reruns(slots: Stack) -> None:
    job_ids = start_long_jobs(slots, SLOTS - 1)
    body = long_chat()
    streamed: list[str] = []
    ready = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", f"{slots.api_url}/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    streamed.append(line[6:])
                    if len(streamed) > 5:
                        ready.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert ready.wait(60)
    wait_all_generating(slots, job_ids)
    stream_id = json.loads(streamed[0])["id"]
    all_ids = [*job_ids, stream_id]
    killed_at = time.monotonic()
    slots.worker.stop(signal.SIGKILL)
    records = wait_records(slots, all_ids)
    reader.join(30)
    assert time.monotonic() - killed_at < 15 + 5 + 5  # JOB_LEASE_SECONDS + reaper interval + slack
    assert [(r["status"], r.get("error_code")) for r in records] == [("failed", "worker_lost")] * SLOTS
    assert streamed[-1] == "[DONE]"
    assert json.loads(streamed[-2])["error"]["code"] == "worker_lost"

    before = ready_workers(slots)
    restart_worker(slots)
    assert ready_workers(slots) - before
    # Redis hands the 4 unacknowledged messages back (visibility timeout 5 s); each claim refuses.
    log = slots.worker.log_path
    slots.worker.wait_until(
        lambda: all(f"job {j} is no longer queued" in log.read_text() for j in all_ids), 60
    )
    for job_id in all_ids:
        assert sum(isinstance(e, events.Started) for e in job_events(slots, job_id)) == 1
        assert record(slots, job_id)["status"] == "failed"
