"""The Files and Batch APIs through the official SDK, on the real stack: the full flow, invalid
files and lines, per-key privacy, limits, cancel, expiry, a worker killed mid-batch and an API
restart, and interactive requests going ahead of a busy batch.

Time bounds here detect hangs; they are not performance figures (those are in bench/)."""

from __future__ import annotations

import json
import signal
from typing import Any

import httpx
import openai
import pytest

from tasks import keys
from tests.integration.conftest import Preset, Stack, restart_worker, stack_fixture
from tests.integration.helpers import LONG_PROMPT, TERMINAL, rdb, wait_batch, wait_for
from tests.integration.helpers import sdk as stack_sdk
from tests.processes import ROOT, start_api, start_redis

KEY_A, KEY_B = "batch-key-a", "batch-key-b"
SLOTS = 2
MAX_FILE_BYTES = 100_000
MAX_BATCH_LINES = 40
ENDED = {"completed", "failed", "expired", "cancelled"}

batches = stack_fixture(
    Preset.api_keys(KEY_A, KEY_B)
    .with_(
        WORKER_SLOTS=str(SLOTS),
        JOB_LEASE_SECONDS="3",
        MAX_FILE_BYTES=str(MAX_FILE_BYTES),
        MAX_BATCH_LINES=str(MAX_BATCH_LINES),
    )
    .named("batches")
)


def sdk(stack: Stack, key: str = KEY_A) -> openai.OpenAI:
    return stack_sdk(stack, key, timeout=60)


def chat_line(custom_id: str, content: str = "Say hello.", **body: Any) -> dict[str, Any]:
    request = {"messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0}
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {**request, **body},
    }


def jsonl(lines: list[Any]) -> bytes:
    return "".join(
        (x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n" for x in lines
    ).encode()


def submit(client: openai.OpenAI, content: bytes, endpoint: str = "/v1/chat/completions") -> Any:
    uploaded = client.files.create(file=("input.jsonl", content), purpose="batch")
    return client.batches.create(
        input_file_id=uploaded.id,
        endpoint=endpoint,  # type: ignore[arg-type]
        completion_window="24h",
        metadata={"suite": "batches"},
    )


def file_lines(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def every_line_once(client: openai.OpenAI, batch: Any, custom_ids: list[str]) -> tuple[list[Any], list[Any]]:
    out, err = file_lines(client, batch.output_file_id), file_lines(client, batch.error_file_id)
    assert sorted(x["custom_id"] for x in out + err) == sorted(custom_ids)
    assert batch.request_counts.total == len(custom_ids)
    assert (batch.request_counts.completed, batch.request_counts.failed) == (len(out), len(err))
    return out, err


def test_full_flow_through_the_sdk(batches: Stack) -> None:
    client = sdk(batches)
    prompts = {f"q{i}": f"Name a colour, number {i}." for i in range(5)}
    prompts["ru"] = "Назови столицу России одним словом."
    batch = submit(client, jsonl([chat_line(cid, text) for cid, text in prompts.items()]))
    assert batch.status == "validating" and batch.endpoint == "/v1/chat/completions"
    assert batch.metadata == {"suite": "batches"} and batch.completion_window == "24h"
    done = wait_batch(client, batch.id, ENDED)
    assert done.status == "completed", done
    assert done.in_progress_at and done.finalizing_at and done.completed_at and done.expires_at
    assert done.error_file_id is None
    out, _ = every_line_once(client, done, list(prompts))
    for line in out:
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert line["response"]["status_code"] == 200
        body = line["response"]["body"]
        assert body["object"] == "chat.completion" and body["id"] == line["response"]["request_id"]
        assert body["choices"][0]["message"]["content"]
        assert body["usage"]["completion_tokens"] <= 8
    # The body is what the endpoint itself answers for that request (greedy, so the same text).
    ru = next(x for x in out if x["custom_id"] == "ru")["response"]["body"]
    direct = client.chat.completions.create(
        model=ru["model"], messages=[{"role": "user", "content": prompts["ru"]}], max_tokens=8, temperature=0
    )
    assert ru["choices"][0]["message"]["content"] == direct.choices[0].message.content
    assert ru["choices"][0]["finish_reason"] == direct.choices[0].finish_reason
    # Listed, newest first; the output file is a batch_output file of this key.
    assert client.batches.list(limit=1).data[0].id == batch.id
    output = client.files.retrieve(done.output_file_id)
    assert output.purpose == "batch_output" and output.bytes > 0
    assert done.output_file_id in {f.id for f in client.files.list(purpose="batch_output")}
    metrics = httpx.get(f"{batches.api_url}/metrics", timeout=10).text
    assert 'llmq_batches_ended_total{status="completed"}' in metrics
    assert "llmq_batch_lines_waiting" in metrics and "llmq_batch_lines_running" in metrics


def test_responses_endpoint_batch(batches: Stack) -> None:
    client = sdk(batches)
    lines = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/responses",
            "body": {"input": "Say hi.", "max_output_tokens": 6, "temperature": 0},
        }
        for i in range(2)
    ]
    done = wait_batch(client, submit(client, jsonl(lines), "/v1/responses").id, ENDED)
    assert done.status == "completed"
    out, _ = every_line_once(client, done, ["r0", "r1"])
    for line in out:
        body = line["response"]["body"]
        assert body["object"] == "response" and body["status"] in ("completed", "incomplete")
        assert body["output"][0]["content"][0]["text"]
        assert body["background"] is False


@pytest.mark.parametrize(
    ("lines", "code", "line_number"),
    [
        (['{"custom_id": "a", "method": "POST"', chat_line("b")], "invalid_json_line", 1),
        ([chat_line("a"), {**chat_line("b"), "url": "/v1/responses"}], "mismatched_url", 2),
        ([chat_line("a"), chat_line("b"), chat_line("a")], "duplicate_custom_id", 3),
        ([chat_line("a"), chat_line("b", stream=True)], "stream_unsupported", 2),
        ([chat_line("a"), {**chat_line("b"), "method": "GET"}], "invalid_method", 2),
        ([{"method": "POST", "url": "/v1/chat/completions", "body": {}}], "invalid_custom_id", 1),
        (["", "  "], "empty_file", None),
    ],
    ids=["not-jsonl", "url", "duplicate", "stream", "method", "custom-id", "empty"],
)
def test_an_invalid_file_fails_the_batch_at_validation(
    batches: Stack, lines: list[Any], code: str, line_number: int | None
) -> None:
    client = sdk(batches)
    done = wait_batch(client, submit(client, jsonl(lines)).id, ENDED)
    assert done.status == "failed" and done.failed_at
    assert done.errors is not None
    assert [(e.code, e.line) for e in done.errors.data] == [(code, line_number)]
    assert done.request_counts.total == 0 and done.output_file_id is None and done.error_file_id is None
    assert done.in_progress_at is None  # nothing was queued


def test_a_line_the_endpoint_refuses_gets_the_endpoints_own_error(batches: Stack) -> None:
    client = sdk(batches)
    refused = {
        "hot": {"temperature": 9},
        "model": {"model": "gpt-5"},
        "big": {"max_tokens": 10**6},
        "many": {"n": 99},
    }
    lines = [chat_line("ok")] + [chat_line(cid, **extra) for cid, extra in refused.items()]
    # A lone surrogate is valid JSON text, which the endpoint refuses: written raw, not escaped.
    lines.append(json.dumps(chat_line("surrogate", "\ud800")))
    done = wait_batch(client, submit(client, jsonl(lines)).id, ENDED)
    assert done.status == "completed"
    out, err = every_line_once(client, done, ["ok", *refused, "surrogate"])
    assert [x["custom_id"] for x in out] == ["ok"]
    by_id = {x["custom_id"]: x["response"] for x in err}
    headers = {"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json"}
    for cid, extra in refused.items():
        direct = httpx.post(
            f"{batches.api_url}/v1/chat/completions",
            json=chat_line(cid, **extra)["body"],
            headers=headers,
            timeout=30,
        )
        assert by_id[cid]["status_code"] == direct.status_code >= 400
        assert by_id[cid]["body"] == direct.json()
    raw = json.dumps(chat_line("surrogate", "\ud800")["body"]).encode()
    direct = httpx.post(f"{batches.api_url}/v1/chat/completions", content=raw, headers=headers, timeout=30)
    assert by_id["surrogate"]["status_code"] == direct.status_code == 400
    assert by_id["surrogate"]["body"]["error"]["code"] == direct.json()["error"]["code"]


def test_limits_are_refused_before_anything_is_queued(batches: Stack) -> None:
    client = sdk(batches)
    with pytest.raises(openai.APIStatusError) as too_big:
        client.files.create(file=("big.jsonl", b"x" * (MAX_FILE_BYTES + 1)), purpose="batch")
    assert too_big.value.status_code == 413
    assert too_big.value.body["code"] == "request_too_large"  # type: ignore[index]
    many = client.files.create(
        file=("many.jsonl", jsonl([chat_line(f"l{i}") for i in range(MAX_BATCH_LINES + 1)])), purpose="batch"
    )
    before = client.batches.list(limit=100).data
    with pytest.raises(openai.BadRequestError) as too_many:
        client.batches.create(input_file_id=many.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert too_many.value.body["code"] == "too_many_requests"  # type: ignore[index]
    assert client.batches.list(limit=100).data == before
    with pytest.raises(openai.BadRequestError) as purpose:
        client.files.create(file=("x.jsonl", jsonl([chat_line("a")])), purpose="fine-tune")
    assert purpose.value.body["param"] == "purpose"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        client.batches.create(
            input_file_id=many.id,
            endpoint="/v1/embeddings",  # type: ignore[arg-type]
            completion_window="24h",
        )
    with pytest.raises(openai.NotFoundError):
        client.batches.create(
            input_file_id="file-" + "0" * 24, endpoint="/v1/chat/completions", completion_window="24h"
        )


def test_files_and_batches_belong_to_the_key_that_made_them(batches: Stack) -> None:
    owner, other = sdk(batches, KEY_A), sdk(batches, KEY_B)
    batch = submit(owner, jsonl([chat_line("mine")]))
    file_id = batch.input_file_id
    for call in (
        lambda: other.files.retrieve(file_id),
        lambda: other.files.content(file_id),
        lambda: other.files.delete(file_id),
        lambda: other.batches.retrieve(batch.id),
        lambda: other.batches.cancel(batch.id),
        lambda: other.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        ),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert batch.id not in {b.id for b in other.batches.list(limit=100).data}
    assert file_id not in {f.id for f in other.files.list()}
    done = wait_batch(owner, batch.id, ENDED)
    with pytest.raises(openai.NotFoundError):
        other.files.content(done.output_file_id)
    assert owner.files.delete(file_id).deleted
    with pytest.raises(openai.NotFoundError):
        owner.files.retrieve(file_id)
    assert file_lines(owner, done.output_file_id)  # the output outlives its input file


def long_lines(count: int, max_tokens: int = 60) -> list[dict[str, Any]]:
    return [chat_line(f"long{i}", LONG_PROMPT, max_tokens=max_tokens, ignore_eos=True) for i in range(count)]


def batch_jobs(stack: Stack, batch_id: str) -> dict[str, dict[str, str]]:
    """The batch's current job per line (while it runs), with each job's record."""
    db = rdb(stack)
    return {j: db.hgetall(keys.job(j)) for j in db.hvals(keys.batch_part(batch_id, "jobs"))}


def wait_running_lines(stack: Stack, batch_id: str, count: int, timeout: float = 60) -> None:
    wait_for(
        lambda: sum(r.get("status") == "in_progress" for r in batch_jobs(stack, batch_id).values()) >= count,
        timeout,
        f"{count} lines of {batch_id} running",
    )


def test_cancel_while_running(batches: Stack) -> None:
    client = sdk(batches)
    ids = [f"long{i}" for i in range(8)]
    batch = submit(client, jsonl(long_lines(8, max_tokens=300)))
    wait_running_lines(batches, batch.id, SLOTS)
    jobs_before = batch_jobs(batches, batch.id)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    done = wait_batch(client, batch.id, ENDED, timeout=60)
    assert done.status == "cancelled" and done.cancelled_at
    out, err = every_line_once(client, done, ids)
    assert len(err) >= 8 - SLOTS - len(out)
    assert all(x["error"]["code"] == "batch_cancelled" and x["response"] is None for x in err)
    # Lines that were still queued never ran; running ones stopped between tokens.
    db = rdb(batches)
    for job_id, before in jobs_before.items():
        after = db.hgetall(keys.job(job_id))
        assert after["status"] in ("cancelled", "incomplete", "completed")
        if before["status"] == "queued":
            assert "started_at" not in after
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(wait_batch(client, submit(client, jsonl([chat_line("x")])).id, ENDED).id)


def test_a_batch_whose_step_keeps_failing_ends_failed_and_stops_its_lines(batches: Stack) -> None:
    client = sdk(batches)
    broken = submit(client, jsonl(long_lines(6, max_tokens=40)))
    wait_running_lines(batches, broken.id, 1)
    line_jobs = batch_jobs(batches, broken.id)
    assert len(line_jobs) == 6
    # Its stored lines made unreadable: every step that reads one now raises, as a bug would.
    db = rdb(batches)
    part = keys.batch_part(broken.id, "lines")
    for index in range(db.llen(part)):
        db.lset(part, index, "{")
    healthy = submit(client, jsonl([chat_line("h0"), chat_line("h1")]))
    done = wait_batch(client, broken.id, ENDED, timeout=60)
    assert done.status == "failed" and done.failed_at
    assert done.errors is not None and [e.code for e in done.errors.data or []] == ["internal_error"]
    wait_for(
        lambda: all(db.hget(keys.job(j), "status") in TERMINAL for j in line_jobs),
        30,
        "every line of the failed batch to end",
    )
    # None started after its batch failed (failed_at is in whole seconds).
    started = [float(db.hget(keys.job(j), "started_at") or 0) for j in line_jobs]
    assert max(started) < done.failed_at + 1
    # The other batch was carried on meanwhile.
    assert wait_batch(client, healthy.id, ENDED).status == "completed"


def test_an_interactive_request_goes_ahead_of_queued_batch_lines(batches: Stack) -> None:
    client = sdk(batches)
    batch = submit(client, jsonl(long_lines(10, max_tokens=40)))
    wait_running_lines(batches, batch.id, SLOTS)
    with httpx.Client(timeout=120) as http:
        r = http.post(
            f"{batches.api_url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
            headers={"Authorization": f"Bearer {KEY_A}"},
        )
    assert r.status_code == 200, r.text
    interactive = rdb(batches).hgetall(keys.job(r.headers["x-request-id"]))
    queued_at = float(interactive["created_at"])
    started_at = float(interactive["started_at"])
    done = wait_batch(client, batch.id, ENDED)
    assert done.status == "completed"
    out, _ = every_line_once(client, done, [f"long{i}" for i in range(10)])
    lines = [rdb(batches).hgetall(keys.job(x["response"]["request_id"])) for x in out]
    # No batch line started while the interactive job waited (the first 0.25 s excused: a slot
    # may free as it is being queued), so it waited at most for one line's remaining generation.
    assert not [x for x in lines if queued_at + 0.25 < float(x["started_at"]) < started_at]
    longest_line = max(float(x["finished_at"]) - float(x["started_at"]) for x in lines)
    assert started_at - queued_at <= longest_line + 0.25


def test_a_worker_killed_and_an_api_restarted_mid_batch_lose_no_line(batches: Stack) -> None:
    client = sdk(batches)
    ids = [f"long{i}" for i in range(6)]
    batch = submit(client, jsonl(long_lines(6, max_tokens=200)))
    wait_running_lines(batches, batch.id, SLOTS)
    lost = {j for j, r in batch_jobs(batches, batch.id).items() if r["status"] == "in_progress"}
    batches.worker.stop(signal.SIGKILL)
    # The API that drove the batch goes too; another instance carries it on.
    second, url = start_api(batches.env, batches.log_dir, name="api-batches-second")
    batches.api.stop()
    batches.api, batches.api_url = second, url
    client = sdk(batches)
    restart_worker(batches, name="worker-after-kill")
    done = wait_batch(client, batch.id, ENDED, timeout=180)
    assert done.status == "completed"
    out, err = every_line_once(client, done, ids)
    db = rdb(batches)
    assert all(db.hget(keys.job(j), "error_code") == "worker_lost" for j in lost)
    # Each lost line ran once more, on the new worker, and finished there.
    assert not err, err
    assert all(x["response"]["request_id"] not in lost for x in out)


def test_a_batch_past_its_window_expires_with_its_finished_lines(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    with (
        Preset.default()
        .with_(BATCH_COMPLETION_WINDOW_SECONDS="6")
        .named("expiry")
        .running(tmp_path_factory) as stack
    ):
        client = stack_sdk(stack, timeout=60)
        lines = [chat_line("short", max_tokens=2)] + long_lines(3, max_tokens=3000)
        batch = submit(client, jsonl(lines))
        assert batch.expires_at - batch.created_at == 6
        done = wait_batch(client, batch.id, ENDED, timeout=60)
        assert done.status == "expired" and done.expired_at
        out, err = every_line_once(client, done, ["short", "long0", "long1", "long2"])
        assert [x["custom_id"] for x in out] == ["short"]
        assert {x["error"]["code"] for x in err} == {"batch_expired"}


def test_a_redis_restart_with_the_shipped_config_loses_no_finished_line(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    persisting = Preset("redis-restart", redis_conf=ROOT / "redis.conf").with_(WORKER_SLOTS="2")
    with persisting.running(tmp_path_factory) as stack:
        client = stack_sdk(stack, timeout=60)
        ids = [f"long{i}" for i in range(8)]
        batch = submit(client, jsonl(long_lines(8, max_tokens=40)))
        results = keys.batch_part(batch.id, "results")
        wait_for(lambda: rdb(stack).hlen(results) >= 3, 120, "three lines to finish")
        finished = rdb(stack).hgetall(results)
        port = int(stack.redis_url.rsplit(":", 1)[1].split("/")[0])
        stack.redis.stop()  # SIGTERM: Redis writes its AOF and exits, as in a planned restart
        stack.redis, _ = start_redis(stack.log_dir, port=port, conf=ROOT / "redis.conf")
        done = wait_batch(client, batch.id, ENDED, timeout=180)
        assert done.status == "completed"
        out, err = every_line_once(client, done, ids)
        # Every line finished before the restart is in the output as it was, not run again.
        by_id = {x["custom_id"]: json.dumps(x, ensure_ascii=False) for x in out}
        for line in finished.values():
            assert by_id[json.loads(line)["custom_id"]] == line
