"""API keys, per-key privacy of background jobs, request limits, and error bodies that leak nothing.

One stack of its own, with API_KEYS and small limits so each case is cheap to hit.
"""

from __future__ import annotations

import hashlib
from typing import Any

import httpx
import openai
import pytest

from tasks import jobs, keys
from tests.integration.conftest import Preset, Stack, stack_fixture
from tests.integration.helpers import rdb, wait_response
from tests.integration.helpers import sdk as stack_sdk

KEY_A, KEY_B = "key-a", "key-b"
WRONG_KEY = "sk-wrong-secret-0123"
MAX_REQUEST_BYTES = 4096
MAX_MESSAGES = 4
MAX_TOKENS_LIMIT = 64
ERROR_FIELDS = {"message", "type", "param", "code"}

sec = stack_fixture(
    Preset.api_keys(KEY_A, KEY_B)
    .with_(
        MAX_REQUEST_BYTES=str(MAX_REQUEST_BYTES),
        MAX_MESSAGES=str(MAX_MESSAGES),
        MAX_TOKENS_LIMIT=str(MAX_TOKENS_LIMIT),
    )
    .named("sec")
)


def sdk(stack: Stack, key: str) -> openai.OpenAI:
    return stack_sdk(stack, key, timeout=60)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def user(n: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": "Hi"}] * n


def assert_error(r: httpx.Response, status: int, code: str, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error: dict[str, Any] = r.json()["error"]
    assert set(error) == ERROR_FIELDS
    assert (error["code"], error["param"]) == (code, param)
    assert error["type"] == "invalid_request_error"
    return error


@pytest.fixture(scope="module")
def client_a(sec: Stack) -> openai.OpenAI:
    return sdk(sec, KEY_A)


@pytest.fixture(scope="module")
def model(client_a: openai.OpenAI) -> str:
    return client_a.models.list().data[0].id


@pytest.fixture(scope="module")
def job_a(client_a: openai.OpenAI, model: str) -> str:
    """A background response created with key A."""
    job = client_a.responses.create(model=model, input="Hi", max_output_tokens=4, background=True)
    return job.id


# --- authentication -------------------------------------------------------------------------

V1_CALLS = [
    ("POST", "/v1/chat/completions", {"messages": user(1), "max_tokens": 1}),
    ("POST", "/v1/responses", {"input": "Hi", "max_output_tokens": 1}),
    ("GET", "/v1/models", None),
    ("GET", "/v1/responses/resp_x", None),
    ("POST", "/v1/responses/resp_x/cancel", None),
]
BAD_HEADERS = {
    "missing": {},
    "wrong key": bearer(WRONG_KEY),
    "basic scheme": {"Authorization": "Basic x"},
    "bearer alone": {"Authorization": "Bearer"},
    "key in other case": bearer(KEY_A.upper()),
    "key with suffix": bearer(KEY_A + "x"),
    "key without scheme": {"Authorization": KEY_A},
}


@pytest.mark.parametrize(("method", "path", "body"), V1_CALLS)
@pytest.mark.parametrize("headers", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
def test_v1_without_a_valid_key_is_401(
    sec: Stack, method: str, path: str, body: Any, headers: dict[str, str]
) -> None:
    r = httpx.request(method, f"{sec.api_url}{path}", json=body, headers=headers, timeout=10)
    error = assert_error(r, 401, "invalid_api_key")
    assert r.headers["www-authenticate"] == "Bearer"
    assert WRONG_KEY not in error["message"]


def test_sdk_raises_authentication_error(sec: Stack, model: str) -> None:
    wrong = sdk(sec, WRONG_KEY)
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.chat.completions.create(model=model, messages=user(1), max_tokens=1)  # type: ignore[arg-type]
    assert info.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.responses.create(model=model, input="Hi", max_output_tokens=1)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_health_and_docs_stay_open(sec: Stack) -> None:
    assert httpx.get(f"{sec.api_url}/health", timeout=10).status_code == 200
    spec = httpx.get(f"{sec.api_url}/openapi.json", timeout=10)
    assert spec.status_code == 200
    assert spec.json()["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


@pytest.mark.parametrize("key", [KEY_A, KEY_B])
def test_every_configured_key_works(sec: Stack, model: str, key: str) -> None:
    client = sdk(sec, key)
    assert [m.id for m in client.models.list().data] == [model]
    chat = client.chat.completions.create(model=model, messages=user(1), max_tokens=2, temperature=0)  # type: ignore[arg-type]
    assert chat.choices[0].message.content, chat  # the model's own text, not just a 200
    response = client.responses.create(model=model, input="Hi", max_output_tokens=2, temperature=0)
    assert response.status in ("completed", "incomplete")
    assert response.output_text == chat.choices[0].message.content  # the same greedy answer


# --- a background job belongs to its key ----------------------------------------------------


def test_another_keys_job_is_404_for_read_stream_and_cancel(
    sec: Stack, client_a: openai.OpenAI, job_a: str
) -> None:
    client_b = sdk(sec, KEY_B)
    unknown = httpx.get(f"{sec.api_url}/v1/responses/{job_a}x", headers=bearer(KEY_B), timeout=10)
    unknown_message = assert_error(unknown, 404, "not_found", "response_id")["message"]

    with pytest.raises(openai.NotFoundError):
        client_b.responses.retrieve(job_a)
    with pytest.raises(openai.NotFoundError):
        client_b.responses.cancel(job_a)
    calls = [
        ("GET", f"/v1/responses/{job_a}", {}),
        ("GET", f"/v1/responses/{job_a}", {"stream": "true"}),
        ("GET", f"/v1/responses/{job_a}", {"stream": "true", "starting_after": "0"}),
        ("POST", f"/v1/responses/{job_a}/cancel", {}),
    ]
    for method, path, params in calls:
        r = httpx.request(method, f"{sec.api_url}{path}", params=params, headers=bearer(KEY_B), timeout=10)
        error = assert_error(r, 404, "not_found", "response_id")
        # Worded exactly as for an id that does not exist: nothing tells B the job is there.
        assert error["message"].replace(job_a, "") == unknown_message.replace(f"{job_a}x", "")

    # Key A still sees its job, which B's cancel did not touch.
    done = wait_response(client_a, job_a)
    assert done.status in ("completed", "incomplete")
    assert done.output_text
    events = list(client_a.responses.retrieve(job_a, stream=True))
    assert events[-1].type in ("response.completed", "response.incomplete")


def test_job_ids_are_unguessable(client_a: openai.OpenAI, job_a: str, model: str) -> None:
    other = client_a.responses.create(model=model, input="Hi", max_output_tokens=1, background=True)
    for job_id in (job_a, other.id):
        assert job_id.startswith("resp_")
        assert len(job_id.removeprefix("resp_")) == 32  # 128 random bits, hex
    assert job_a != other.id


# --- request limits -------------------------------------------------------------------------


SIZED_BODIES = {
    "over by content-length": (
        "/v1/chat/completions",
        False,
        [b'{"messages": [{"role": "user", "content": "' + b"x" * MAX_REQUEST_BYTES + b'"}]}'],
        413,
    ),
    "chunked over": (
        "/v1/responses",
        True,
        [b'{"input": "', *[b"x" * 512] * (2 * MAX_REQUEST_BYTES // 512), b'"}'],
        413,
    ),
    "chunked under": (
        "/v1/chat/completions",
        True,
        [b'{"messages": [{"role": "user", ', b'"content": "Hi"}], "max_tokens": 2}'],
        200,
    ),
}


@pytest.mark.parametrize(
    ("path", "chunked", "parts", "status"), SIZED_BODIES.values(), ids=SIZED_BODIES.keys()
)
def test_body_size_limit_with_and_without_content_length(
    sec: Stack, path: str, chunked: bool, parts: list[bytes], status: int
) -> None:
    r = httpx.post(
        f"{sec.api_url}{path}",
        content=iter(parts) if chunked else b"".join(parts),
        headers={**bearer(KEY_A), "Content-Type": "application/json"},
        timeout=60,
    )
    if chunked:
        assert "content-length" not in r.request.headers
        assert r.request.headers["transfer-encoding"] == "chunked"
    else:
        assert r.request.headers["content-length"] == str(len(parts[0]))
    if status == 413:
        assert_error(r, 413, "request_too_large")
    else:
        assert r.status_code == 200, r.text
        assert r.json()["object"] == "chat.completion"


def test_too_many_messages(sec: Stack, client_a: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client_a.chat.completions.create(model=model, messages=user(MAX_MESSAGES + 1), max_tokens=1)  # type: ignore[arg-type]
    assert (info.value.code, info.value.param) == ("too_many_messages", "messages")
    r = httpx.post(
        f"{sec.api_url}/v1/responses",
        json={"input": user(MAX_MESSAGES + 1), "max_output_tokens": 1},
        headers=bearer(KEY_A),
        timeout=10,
    )
    assert_error(r, 400, "too_many_messages", "input")
    at_limit = client_a.chat.completions.create(model=model, messages=user(MAX_MESSAGES), max_tokens=1)  # type: ignore[arg-type]
    assert at_limit.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"messages": user(1), "max_tokens": MAX_TOKENS_LIMIT + 1}, "max_tokens"),
        (
            "/v1/chat/completions",
            {"messages": user(1), "max_completion_tokens": MAX_TOKENS_LIMIT + 1},
            "max_completion_tokens",
        ),
        (
            "/v1/chat/completions",
            {"messages": user(1), "max_tokens": 1, "max_completion_tokens": 10**9},
            "max_completion_tokens",
        ),
        ("/v1/responses", {"input": "Hi", "max_output_tokens": MAX_TOKENS_LIMIT + 1}, "max_output_tokens"),
        (
            "/v1/responses",
            {"input": "Hi", "max_output_tokens": MAX_TOKENS_LIMIT + 1, "background": True},
            "max_output_tokens",
        ),
    ],
)
def test_max_tokens_over_the_cap_is_400(sec: Stack, path: str, body: dict[str, Any], param: str) -> None:
    r = httpx.post(f"{sec.api_url}{path}", json=body, headers=bearer(KEY_A), timeout=10)
    assert_error(r, 400, "max_tokens_too_large", param)


def test_max_tokens_over_the_cap_through_the_sdk(client_a: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client_a.responses.create(model=model, input="Hi", max_output_tokens=MAX_TOKENS_LIMIT + 1)
    assert (info.value.code, info.value.param) == ("max_tokens_too_large", "max_output_tokens")


def test_stored_job_has_the_owner_tag_and_a_capped_default(
    sec: Stack, client_a: openai.OpenAI, model: str
) -> None:
    # No max_output_tokens: the default (512) is lowered to MAX_TOKENS_LIMIT.
    job = client_a.responses.create(model=model, input="Hi", background=True)
    client_a.responses.cancel(job.id)
    stored = rdb(sec).hgetall(keys.job(job.id))
    spec = jobs.JobSpec.model_validate_json(stored["spec"])
    meta = jobs.JobMeta.model_validate_json(stored["meta"])
    assert spec.sampling.max_tokens == MAX_TOKENS_LIMIT
    assert meta.owner == hashlib.sha256(KEY_A.encode()).hexdigest()[:32]
    assert "owner" not in stored["spec"]  # the worker's spec holds no API-only data
    assert all(KEY_A not in value for value in stored.values())  # the key itself is never stored


# --- nothing leaks in error bodies ----------------------------------------------------------

LEAKS = ("Traceback", "/work", "/tmp", ".py", KEY_A, KEY_B, WRONG_KEY)
ERROR_CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "no key": ("POST", "/v1/chat/completions", {"json": {"messages": user(1)}}),
    "wrong key": ("GET", "/v1/models", {"headers": bearer(WRONG_KEY)}),
    "key as basic": ("GET", "/v1/models", {"headers": {"Authorization": f"Basic {KEY_A}"}}),
    "too large": ("POST", "/v1/chat/completions", {"content": b"x" * (MAX_REQUEST_BYTES + 1)}),
    "invalid json": ("POST", "/v1/chat/completions", {"content": b'{"messages": [', "key": True}),
    "not an object": ("POST", "/v1/responses", {"json": [1, 2], "key": True}),
    "bad field": ("POST", "/v1/chat/completions", {"json": {"messages": "x"}, "key": True}),
    "too many": ("POST", "/v1/chat/completions", {"json": {"messages": user(9)}, "key": True}),
    "too many tokens": (
        "POST",
        "/v1/responses",
        {"json": {"input": "x", "max_output_tokens": 99}, "key": True},
    ),
    "unknown model": ("POST", "/v1/responses", {"json": {"input": "x", "model": "gpt-9"}, "key": True}),
    "unknown id": ("GET", "/v1/responses/resp_nope", {"key": True}),
    "other key's job": ("GET", "/v1/responses/{job_a}", {"headers": bearer(KEY_B)}),
    "unknown route": ("GET", "/v1/nothing", {"key": True}),
    "wrong method": ("DELETE", "/v1/models", {"key": True}),
}


@pytest.mark.parametrize(("method", "path", "kwargs"), ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_error_bodies_hold_no_traceback_path_or_key(
    sec: Stack, job_a: str, method: str, path: str, kwargs: dict[str, Any]
) -> None:
    kwargs = dict(kwargs)
    headers = kwargs.pop("headers", {})
    if kwargs.pop("key", False):
        headers = bearer(KEY_A)
    r = httpx.request(
        method, f"{sec.api_url}{path.format(job_a=job_a)}", headers=headers, timeout=10, **kwargs
    )
    assert 400 <= r.status_code < 500, r.text
    assert set(r.json()["error"]) == ERROR_FIELDS
    assert r.json()["error"]["code"]  # every error carries a stable code
    for leak in LEAKS:
        assert leak not in r.text, leak
