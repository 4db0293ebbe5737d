"""Per-key rate limits through the openai client: the 429 and its headers, the SDK's own retry,
OpenAI's x-ratelimit-* headers on every kind of response, tokens charged exactly what a
completion used, keys apart; and the bucket script and the end charge on a bare redis-server.

One stack with API_KEYS and REQUESTS_PER_MINUTE_PER_KEY, plus a second API on it with
TOKENS_PER_MINUTE_PER_KEY instead (the limits are the API's settings; the worker's end charge
reads the limit from the bucket). Each test has keys of its own, so none sees another's takes.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest
import redis

from api.edge.auth import owner_tag
from tasks import events, jobs, keys, quotas
from tasks.scripts import Scripts
from tests import needs
from tests.integration.conftest import Preset, Stack, stack_fixture
from tests.integration.helpers import record
from tests.processes import start_api, start_redis

pytestmark = pytest.mark.integration

RPM = 10  # one request refills every 6 s: the SDK's retry waits that long
# 0.05 tokens a second: over the few seconds a completion takes the bucket refills by a fraction
# of a token, so what a completion was charged is known to the token.
TPM = 3
KEYS = [f"key-{c}" for c in "abcdefg"]
HI = [{"role": "user", "content": "Hi"}]  # estimated at ceil(2 / 4) = 1 token

limited = stack_fixture(
    Preset.api_keys(*KEYS).with_(REQUESTS_PER_MINUTE_PER_KEY=str(RPM)).named("rate-limits")
)


def on(url: str, key: str, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=retries, timeout=60)


def seconds(go: str) -> float:
    """A Go duration (`12ms`, `1.5s`, `6m0s`) in seconds."""
    if ms := re.fullmatch(r"(\d+)ms", go):
        return int(ms[1]) / 1000
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:([\d.]+)s)", go)
    assert parts, go
    hours, minutes, secs = parts.groups()
    return int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(secs)


def limits_of(headers: object, kind: str) -> dict[str, str]:
    return {
        part: headers[f"x-ratelimit-{part}-{kind}"]  # type: ignore[index]
        for part in ("limit", "remaining", "reset")
        if f"x-ratelimit-{part}-{kind}" in headers  # type: ignore[operator]
    }


@pytest.fixture(scope="module")
def model(limited: Stack) -> str:
    return on(limited.api_url, KEYS[0]).models.list().data[0].id


@pytest.fixture(scope="module")
def tpm_url(limited: Stack) -> Iterator[str]:
    """A second API on the stack, with a tokens limit and no requests limit."""
    env = {**limited.env, "REQUESTS_PER_MINUTE_PER_KEY": "0", "TOKENS_PER_MINUTE_PER_KEY": str(TPM)}
    api, url = start_api(env, limited.log_dir, name="api-tpm")
    try:
        yield url
    finally:
        api.stop()


@contextmanager
def drained(
    client: openai.OpenAI, model: str
) -> Iterator[tuple[list[str], list[int], openai.RateLimitError]]:
    """Background responses (answered once queued) until the key's requests refuse: their ids,
    the remaining requests each reported, and the refusal. Their jobs are cancelled on leaving."""
    ids, remaining = [], []
    try:
        for _ in range(RPM + 5):  # a slow loop may see a request refill on the way
            try:
                raw = client.responses.with_raw_response.create(
                    model=model, input="Hi", background=True, max_output_tokens=1
                )
            except openai.RateLimitError as refused:
                yield ids, remaining, refused
                return
            ids.append(raw.parse().id)
            remaining.append(int(raw.headers["x-ratelimit-remaining-requests"]))
        raise AssertionError(f"{len(ids)} requests and none refused")
    finally:
        for job_id in ids:
            client.responses.cancel(job_id)


def test_the_request_past_the_limit_gets_openai_s_429(limited: Stack, model: str) -> None:
    with drained(on(limited.api_url, "key-a"), model) as (ids, remaining, refused):
        assert len(ids) >= RPM
    assert remaining[:2] == [RPM - 1, RPM - 2]  # each response says what its take left
    assert remaining == sorted(remaining, reverse=True)
    assert (refused.status_code, refused.code, refused.type) == (429, "rate_limit_exceeded", "requests")
    assert "requests per minute" in refused.message
    headers = refused.response.headers
    wait = int(headers["retry-after-ms"]) / 1000
    assert 0 < wait <= 60 / RPM  # until one request has refilled
    assert int(headers["retry-after"]) == max(1, -(-int(headers["retry-after-ms"]) // 1000))
    requests = limits_of(headers, "requests")
    assert (requests["limit"], requests["remaining"]) == (str(RPM), "0")
    assert seconds(requests["reset"]) > wait  # full again only after all ten refill
    assert limits_of(headers, "tokens") == {}  # that limit is off

    # Another key's buckets are its own: full, and it is served.
    other = on(limited.api_url, "key-b")
    assert limits_of(other.models.with_raw_response.list().headers, "requests") == {
        "limit": str(RPM),
        "remaining": str(RPM),
        "reset": "0s",
    }
    served = other.chat.completions.with_raw_response.create(model=model, messages=HI, max_tokens=2)
    assert served.parse().choices[0].finish_reason in ("stop", "length")
    assert served.headers["x-ratelimit-remaining-requests"] == str(RPM - 1)


def test_the_sdk_waits_as_told_and_succeeds_on_its_own(limited: Stack, model: str) -> None:
    with drained(on(limited.api_url, "key-c"), model) as (_, _, refused):
        assert int(refused.response.headers["retry-after-ms"]) <= 60_000 / RPM
        patient = on(limited.api_url, "key-c", retries=2)
        raw = patient.chat.completions.with_raw_response.create(model=model, messages=HI, max_tokens=2)
        assert raw.retries_taken >= 1  # refused at first, let through after the wait it was told
        assert raw.parse().choices[0].message.content is not None


def test_headers_on_a_get_a_stream_and_an_error(limited: Stack, model: str) -> None:
    client = on(limited.api_url, "key-d")
    listed = client.models.with_raw_response.list()
    assert limits_of(listed.headers, "requests") == {"limit": str(RPM), "remaining": str(RPM), "reset": "0s"}

    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=HI, max_tokens=4, stream=True
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    # On the stream's head: the state after its take, one request short, back in 60/RPM s.
    assert limits_of(raw.headers, "requests") == {"limit": str(RPM), "remaining": str(RPM - 1), "reset": "6s"}
    assert [c for c in raw.parse() if c.choices and c.choices[0].finish_reason]

    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.retrieve("resp_" + "0" * 32)
    assert limits_of(missing.value.response.headers, "requests")["limit"] == str(RPM)


def test_a_completion_is_charged_exactly_its_tokens(limited: Stack, tpm_url: str, model: str) -> None:
    key = "key-e"
    client = on(tpm_url, key)
    before = client.models.with_raw_response.list().headers
    assert limits_of(before, "tokens") == {"limit": str(TPM), "remaining": str(TPM), "reset": "0s"}
    assert limits_of(before, "requests") == {}  # off on this API

    started = time.monotonic()
    raw = client.chat.completions.with_raw_response.create(model=model, messages=HI, max_tokens=4)
    completion = raw.parse()
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(TPM - 1)  # the take: the estimate
    after = client.models.with_raw_response.list().headers
    elapsed = time.monotonic() - started
    assert completion.usage is not None
    used = completion.usage.total_tokens
    assert used > TPM
    # The bucket lacks what the completion used, less what refilled since its take: at most
    # `elapsed` seconds' worth, under one token for any elapsed under 20 s, so this pins `used`.
    lacking = seconds(after["x-ratelimit-reset-tokens"]) * TPM / 60
    assert lacking - 0.01 <= used <= lacking + elapsed * TPM / 60 + 0.01
    assert after["x-ratelimit-remaining-tokens"] == "0"
    stored = record(limited, completion.id)
    assert (stored["owner"], stored["estimate"]) == (owner_tag(key), "1")

    # In debt, the key waits until the bucket is positive again; other keys are served.
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model=model, messages=HI, max_tokens=2)
    assert (refused.value.code, refused.value.type) == ("rate_limit_exceeded", "tokens")
    headers = refused.value.response.headers
    wait = int(headers["retry-after-ms"]) / 1000
    debt_seconds = (used - TPM) * 60 / TPM
    assert debt_seconds - (time.monotonic() - started) - 0.01 <= wait <= debt_seconds + 0.01
    assert headers["retry-after"] == str(-(-int(headers["retry-after-ms"]) // 1000))
    assert limits_of(headers, "tokens")["remaining"] == "0"
    other = on(tpm_url, "key-f").chat.completions.create(model=model, messages=HI, max_tokens=2)
    assert other.usage is not None


def test_no_limits_no_headers(client: openai.OpenAI, model_name: str) -> None:
    listed = client.models.with_raw_response.list()
    raw = client.chat.completions.with_raw_response.create(model=model_name, messages=HI, max_tokens=2)
    for headers in (listed.headers, raw.headers):
        assert not [name for name in headers if name.lower().startswith("x-ratelimit")]


# --- The script and the end charge, on a bare redis-server ---------------------------------------

HOLD = 100


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    if shutil.which("redis-server") is None:
        needs.missing("redis-server", "apt-get install redis-server; .ci/run installs it")
    svc, url = start_redis(Path(tmp_path_factory.mktemp("quota-redis")))
    client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=10)
    try:
        yield client
    finally:
        client.close()
        svc.stop()


def take(db: redis.Redis, owner: str, *, rpm: int, tpm: int, tokens: int = 0, mode: str = "take") -> str:
    reply = db.register_script(quotas.TAKE)(keys=[keys.quota(owner)], args=[rpm, tpm, mode, tokens, HOLD])
    return str(reply[0])


def admitted_job(scripts: Scripts, owner: str, content: str, batch: str | None = None) -> jobs.NewJob:
    spec = jobs.JobSpec(
        id=jobs.new_job_id("chat"),
        kind="chat",
        model="m",
        messages=[jobs.Message(role="user", content=content)],
        sampling=jobs.Sampling(max_tokens=4),
        batch=batch,
    )
    job = jobs.NewJob(spec=spec, meta=jobs.JobMeta(owner=owner))
    if batch is None:
        assert scripts.run(jobs.admit(job, ttl=600, max_queued=100, queue_timeout=3600)) is not None
    else:
        assert scripts.run(jobs.admit_batch_line(job, ttl=600)) == 1
    return job


def end(scripts: Scripts, job: jobs.NewJob, event: events.Finished | events.Failed) -> None:
    assert scripts.run(jobs.append(job.spec.id, event, ttl=600)) >= 0


def test_the_end_charge_settles_the_estimate(db: redis.Redis) -> None:
    scripts, owner, tpm = Scripts(db), "charged", 600  # 10 tokens a second
    job = admitted_job(scripts, owner, "Hello, world")  # 12 characters: an estimate of 3
    assert take(db, owner, rpm=RPM, tpm=tpm, tokens=3) == "ok"
    taken = db.hgetall(keys.quota(owner))
    assert float(taken["tok"]) == tpm - 3
    assert float(taken["req"]) == RPM - 1
    end(scripts, job, events.Finished(finish_reason="stop", prompt_tokens=40, completion_tokens=7))
    charged = db.hgetall(keys.quota(owner))
    refilled = (float(charged["at"]) - float(taken["at"])) * tpm / 60
    assert float(charged["tok"]) == pytest.approx(min(tpm, tpm - 3 + refilled) - (40 - 3 + 7), abs=1e-5)
    # The request bucket is refilled to the same moment, and nothing else taken from it.
    assert float(charged["req"]) == pytest.approx(min(RPM, RPM - 1 + refilled * RPM / tpm), abs=1e-5)
    assert db.ttl(keys.quota(owner)) >= HOLD  # the charge never shortens it


def test_failures_batch_lines_and_limits_off_are_not_charged(db: redis.Redis) -> None:
    scripts = Scripts(db)
    failed = admitted_job(scripts, "failing", "Hi")
    assert take(db, "failing", rpm=0, tpm=600, tokens=1) == "ok"
    before = db.hgetall(keys.quota("failing"))
    end(scripts, failed, events.Failed(code="internal_error", message="The generation failed."))
    assert db.hgetall(keys.quota("failing")) == before  # no usage: the estimate stays taken

    line = admitted_job(scripts, "-", "Hi", batch="batch_x")
    assert take(db, "-", rpm=0, tpm=600, tokens=1) == "ok"
    before = db.hgetall(keys.quota("-"))
    end(scripts, line, events.Finished(finish_reason="stop", prompt_tokens=40, completion_tokens=7))
    assert db.hgetall(keys.quota("-")) == before  # batch lines have their batch's share

    untaken = admitted_job(scripts, "no-tokens-limit", "Hi")
    assert take(db, "no-tokens-limit", rpm=RPM, tpm=0) == "ok"
    before = db.hgetall(keys.quota("no-tokens-limit"))
    end(scripts, untaken, events.Finished(finish_reason="stop", prompt_tokens=40, completion_tokens=7))
    assert db.hgetall(keys.quota("no-tokens-limit")) == before


def test_refusals_and_peeks_write_nothing(db: redis.Redis) -> None:
    assert take(db, "peeker", rpm=RPM, tpm=100, mode="peek") == "ok"
    assert not db.exists(keys.quota("peeker"))  # a full bucket is no hash at all

    assert take(db, "one", rpm=1, tpm=100, tokens=5) == "ok"
    state = db.hgetall(keys.quota("one"))
    assert take(db, "one", rpm=1, tpm=100, tokens=5) == "requests"
    assert take(db, "one", rpm=1, tpm=100, mode="peek") == "ok"
    assert db.hgetall(keys.quota("one")) == state

    assert take(db, "debtor", rpm=0, tpm=100, tokens=250) == "ok"  # positive before: let through
    assert take(db, "debtor", rpm=0, tpm=100, tokens=1) == "tokens"
    # The hash lives until the bucket is full again (250 tokens short, at 100 a minute), at
    # least HOLD seconds.
    assert 250 * 60 / 100 <= db.ttl(keys.quota("debtor")) <= 250 * 60 / 100 + 2
