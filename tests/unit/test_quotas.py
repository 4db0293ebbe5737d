"""The rate limits' pure parts: Go durations, the buckets' figures, the headers and the 429 (no
processes; the Lua that keeps the buckets runs in tests/integration/test_rate_limits.py)."""

from __future__ import annotations

import pytest

from api.edge.rate_limits import go_duration, headers, refusal
from tasks import jobs, quotas
from tasks.sampling import Sampling


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (-1.0, "0s"),
        (0.0001, "1ms"),  # rounded up: a client waiting this long finds the bucket refilled
        (0.012, "12ms"),
        (0.999, "999ms"),
        (0.9991, "1s"),
        (1, "1s"),
        (1.5, "1.5s"),
        (6.512, "6.512s"),
        (59.99, "59.99s"),
        (60, "1m0s"),
        (61.5, "1m1.5s"),
        (360, "6m0s"),
        (3599.001, "59m59.001s"),
        (3600, "1h0m0s"),
        (3723.25, "1h2m3.25s"),
    ],
)
def test_go_duration(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text


def test_a_full_bucket() -> None:
    bucket = quotas.Bucket(limit=60, level=60)
    assert bucket.remaining == 60
    assert bucket.full_in == 0
    assert bucket.seconds_until(1) == 0


def test_a_bucket_refills_at_its_limit_per_minute() -> None:
    bucket = quotas.Bucket(limit=120, level=30)  # 2 a second
    assert bucket.remaining == 30
    assert bucket.full_in == pytest.approx(45)
    assert bucket.seconds_until(31) == pytest.approx(0.5)


def test_a_bucket_in_debt() -> None:
    bucket = quotas.Bucket(limit=6, level=-30.5)  # 0.1 a second
    assert bucket.remaining == 0  # never negative, as OpenAI's
    assert bucket.full_in == pytest.approx(365)
    assert bucket.seconds_until(0) == pytest.approx(305)


def test_remaining_is_whole_and_at_most_the_limit() -> None:
    assert quotas.Bucket(limit=10, level=3.999).remaining == 3
    assert quotas.Bucket(limit=10, level=10.0).remaining == 10


def test_standing_from_a_take() -> None:
    taken = quotas.standing(["ok", "9.000000", "4996.500000"], rpm=10, tpm=5000)
    assert taken.refused is None
    assert taken.retry_after == 0
    assert taken.requests == quotas.Bucket(10, 9.0)
    assert taken.tokens == quotas.Bucket(5000, 4996.5)


def test_a_limit_that_is_off_has_no_bucket_and_no_headers() -> None:
    taken = quotas.standing(["ok", "9.000000", "0.000000"], rpm=10, tpm=0)
    assert taken.tokens is None
    assert headers(taken) == {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "9",
        "x-ratelimit-reset-requests": "6s",
    }


def test_headers_of_both_limits() -> None:
    standing = quotas.Standing(quotas.Bucket(60, 59.5), quotas.Bucket(6000, 5000))
    assert headers(standing) == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "500ms",
        "x-ratelimit-limit-tokens": "6000",
        "x-ratelimit-remaining-tokens": "5000",
        "x-ratelimit-reset-tokens": "10s",
    }


def test_a_refused_request_waits_for_one_request() -> None:
    refused = quotas.standing(["requests", "0.250000", "100.000000"], rpm=30, tpm=1000)
    assert refused.retry_after == pytest.approx(1.5)  # 0.75 of a request, at one each 2 s
    error = refusal(refused)
    assert (error.status, error.type, error.code) == (429, "requests", "rate_limit_exceeded")
    assert error.headers() == {"Retry-After": "2", "retry-after-ms": "1500"}
    assert "requests per minute (RPM)" in error.message
    assert "limit 30" in error.message
    assert "1.5s" in error.message


def test_a_refused_token_take_waits_until_the_bucket_is_positive() -> None:
    refused = quotas.standing(["tokens", "5.000000", "-30.000000"], rpm=10, tpm=6)
    assert refused.retry_after == pytest.approx(300.001)
    error = refusal(refused)
    assert error.type == "tokens"
    assert error.headers() == {"Retry-After": "301", "retry-after-ms": "300001"}
    assert "tokens per minute (TPM)" in error.message
    assert "5m0.001s" in error.message


def test_retry_after_is_at_least_one_second() -> None:
    error = refusal(quotas.standing(["tokens", "0.000000", "0.000000"], rpm=0, tpm=600_000))
    assert error.headers() == {"Retry-After": "1", "retry-after-ms": "1"}


def test_the_estimate_is_a_quarter_of_the_characters_rounded_up() -> None:
    def spec(*contents: str) -> jobs.JobSpec:
        messages = [jobs.Message(role="user", content=c) for c in contents]
        return jobs.JobSpec(id="chatcmpl-x", kind="chat", model="m", messages=messages, sampling=Sampling())

    assert jobs.estimated_prompt_tokens(spec("")) == 0
    assert jobs.estimated_prompt_tokens(spec("Hi")) == 1
    assert jobs.estimated_prompt_tokens(spec("abcd")) == 1
    assert jobs.estimated_prompt_tokens(spec("abcd", "e")) == 2
