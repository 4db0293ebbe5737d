"""Hostile clients: every body JSON can express, odd content types and odd ids get a clean answer.

The schema fuzzer (test_fuzz.py) draws from the OpenAPI schema; these cases come from the whole
space a client can send: every `\\uXXXX` escape (lone surrogates too), raw control characters,
numbers beyond float and 64-bit ranges, NaN/Infinity literals, deep nesting, duplicate keys,
bodies that are not objects, wrong content types and garbage in path segments. A table holds the
nastiest cases with their exact answers; Hypothesis mutates valid bodies with generated JSON text.

Every answer is a 2xx, or a 4xx in OpenAI's error shape with a non-null code; every answer has an
`x-request-id`; a refused request leaves no job record, queued entry or subscription behind; an
accepted one ends without a worker failure.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import openai
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.conftest import Preset, Stack, stack_fixture
from tests.integration.helpers import TERMINAL, rdb, wait_for

pytestmark = pytest.mark.timeout(300)

CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
ERROR_FIELDS = {"message", "type", "param", "code"}
REQUEST_ID = re.compile(r"(req_|chatcmpl-|resp_)[0-9a-f]{32}")
JSON = "application/json"
# How a Responses stream ends (that API has no [DONE]); a cancelled response ends as failed.
RESPONSE_ENDS = {"response.completed", "response.incomplete", "response.failed"}
# Every stream here is a few tokens long: one still open after this long never ends. The stack
# pings every second, so the bound is checked while a stream is silent too.
STREAM_BOUND_SECONDS = 60

hostile = stack_fixture(
    Preset.default()
    .with_(MAX_TOKENS_LIMIT="4", MAX_MESSAGES="4", REQUEST_TIMEOUT_SECONDS="60")
    .named("hostile")
)


@pytest.fixture(scope="module")
def http(hostile: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=hostile.api_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def store(hostile: Stack) -> Iterator[redis.Redis]:
    client = rdb(hostile)
    yield client
    client.close()


@pytest.fixture(scope="module")
def done_response(http: httpx.Client) -> str:
    """The id of a finished background response, for the id routes."""
    r = http.post(RESPONSES, json={"input": "Hi", "max_output_tokens": 1, "background": True})
    assert r.status_code == 200, r.text
    wait_terminal(http, r.json()["id"])
    return str(r.json()["id"])


# --- what every answer must look like ------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: httpx.Headers
    body: Any  # the JSON body, or the list of SSE data payloads (JSON) for a stream


def send(http: httpx.Client, method: str, path: str, content: str | bytes | None = None, **kw: Any) -> Answer:
    deadline = time.monotonic() + STREAM_BOUND_SECONDS
    lines: list[str] = []
    with http.stream(method, path, content=content, **kw) as r:
        for line in r.iter_lines():
            lines.append(line)
            assert time.monotonic() < deadline, (
                f"{path}: still open after {STREAM_BOUND_SECONDS} s: {lines[-5:]}"
            )
    text = "\n".join(lines)
    assert "Traceback" not in text, text
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        payloads = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
        body: Any = [httpx.Response(200, content=p).json() for p in payloads if p != "[DONE]"]
        if path.startswith(RESPONSES):
            # The stream's last event is its end: the terminal event, or an in-band error.
            assert body and (body[-1].get("type") in RESPONSE_ENDS or "error" in body[-1]), text
        else:
            assert payloads and payloads[-1] == "[DONE]", text
    else:
        body = httpx.Response(200, content=text).json() if text else None
    return Answer(r.status_code, r.headers, body)


def assert_clean(answer: Answer) -> None:
    assert answer.status < 500, answer.body
    assert REQUEST_ID.fullmatch(answer.headers.get("x-request-id", "")), answer.headers
    if answer.status >= 400:
        error = answer.body["error"]
        assert set(error) == ERROR_FIELDS, error
        assert isinstance(error["code"], str) and error["code"], error
    elif isinstance(answer.body, list):  # a stream: no in-band failure for an accepted request
        errors = [e for e in answer.body if "error" in e and e.get("type") is None]
        failed = [e for e in answer.body if e.get("type") == "response.failed"]
        assert not errors and not failed, answer.body


def footprint(store: redis.Redis) -> tuple[set[str], set[str]]:
    """The job keys and the subscribed channels in Redis."""
    return set(store.scan_iter("llmq:job:*", count=1000)), set(store.pubsub_channels("llmq:*"))


def assert_nothing_left(store: redis.Redis, before: tuple[set[str], set[str]]) -> None:
    assert store.zcard("llmq:queued") == 0
    deadline = time.monotonic() + 3
    while footprint(store) != before and time.monotonic() < deadline:
        time.sleep(0.05)  # the API drops a subscription just after answering
    keys, channels = footprint(store)
    assert keys == before[0], "job records left behind"
    assert channels <= before[1], "subscriptions left behind"


def wait_terminal(http: httpx.Client, response_id: str) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        data: dict[str, Any] = http.get(f"{RESPONSES}/{response_id}").json()
        return data if data["status"] in TERMINAL else None

    return wait_for(ended, 60, f"{response_id} to end")


def settle(http: httpx.Client, path: str, answer: Answer) -> None:
    """An accepted request must end without a worker failure; a background one is waited for."""
    if answer.status != 200 or not path.startswith(RESPONSES) or isinstance(answer.body, list):
        return
    data = answer.body
    assert answer.headers["x-request-id"] == data["id"]
    if data["status"] not in TERMINAL:
        data = wait_terminal(http, data["id"])
    assert data["status"] in ("completed", "incomplete"), data


def call(
    http: httpx.Client, store: redis.Redis, method: str, path: str, content: Any = None, **kw: Any
) -> Answer:
    """Send, check the answer is clean, and that a refused request left nothing behind."""
    before = footprint(store)
    answer = send(http, method, path, content, **kw)
    assert_clean(answer)
    if answer.status >= 400:
        assert answer.headers["x-request-id"].startswith("req_"), "a refused request has no job id"
        assert_nothing_left(store, before)
    settle(http, path, answer)
    return answer


# --- the table: the nastiest cases and their exact answers -----------------------------------


def chat(fields: str = "", content: str = '"Hi"') -> str:
    """A chat body as raw JSON text, with `content` and extra `fields` spliced in unparsed."""
    extra = f",{fields}" if fields else ""
    return f'{{"messages":[{{"role":"user","content":{content}}}],"max_tokens":2{extra}}}'


def resp(fields: str = "", input: str = '"Hi"') -> str:
    extra = f",{fields}" if fields else ""
    return f'{{"input":{input},"max_output_tokens":2{extra}}}'


DEEP = "[" * 100 + "]" * 100
ABYSS = "[" * 100_000 + "]" * 100_000
HUGE_INT = "9" * 5000
OK = (200, None, None)

# name: (body, (status, code, param)). Applied to every mode of its endpoint (blocking, streamed,
# and for responses background).
CHAT_CASES: dict[str, tuple[str | bytes, tuple[int, str | None, str | None]]] = {
    "lone high surrogate": (chat(content=r'"\ud800"'), (400, "invalid_value", "messages[0].content")),
    "lone low surrogate": (chat(content=r'"a\udfffb"'), (400, "invalid_value", "messages[0].content")),
    "reversed pair": (chat(content=r'"\udc00\ud800"'), (400, "invalid_value", "messages[0].content")),
    "surrogate in a part": (
        chat(content=r'[{"type":"text","text":"ok"},{"type":"text","text":"\ud800"}]'),
        (400, "invalid_value", "messages[0].content[1].text"),
    ),
    "surrogate in model": (chat(r'"model":"\ud800"'), (400, "invalid_value", "model")),
    "surrogate in a stop": (chat(r'"stop":["x","\udbff"]'), (400, "invalid_value", "stop[1]")),
    "surrogate in user": (chat(r'"user":"\ud800"'), (400, "invalid_value", "user")),
    "surrogate in name": (
        '{"messages":[{"role":"user","content":"Hi","name":"\\ud800"}],"max_tokens":2}',
        (400, "invalid_value", "messages[0].name"),
    ),
    "surrogate in an unknown field": (chat(r'"x_note":"\ud800"'), (400, "invalid_value", "x_note")),
    "surrogate in a key": (chat(r'"\ud800":1'), (400, "invalid_value", None)),
    "CESU-8 surrogate bytes": (chat(content='"\xed\xa0\x80"').encode("latin-1"), (400, "invalid_json", None)),
    "invalid UTF-8": (chat(content='"\xff\xfe"').encode("latin-1"), (400, "invalid_json", None)),
    "UTF-16 body": (chat().encode("utf-16"), (400, "invalid_json", None)),
    "raw control character": (chat(content='"a\x01b"'), (400, "invalid_json", None)),
    "NaN temperature": (chat('"temperature":NaN'), (400, "invalid_json", "temperature")),
    "Infinity top_p": (chat('"top_p":Infinity'), (400, "invalid_json", "top_p")),
    "-Infinity in an unknown field": (chat('"x":[-Infinity]'), (400, "invalid_json", "x[0]")),
    "float overflow": (chat('"temperature":1e400'), (400, "invalid_value", "temperature")),
    "int past 4300 digits": (
        chat(f'"max_completion_tokens":{HUGE_INT}'),
        (400, "invalid_value", "max_completion_tokens"),
    ),
    "int past float range": (chat(f'"temperature":{"9" * 400}'), (400, "invalid_value", "temperature")),
    "seed past 64 bits": (chat('"seed":18446744073709551616'), (400, "invalid_value", "seed")),
    "seed past int64": (chat('"seed":9223372036854775808'), (400, "invalid_value", "seed")),
    "seed below int64": (chat('"seed":-9223372036854775809'), (400, "invalid_value", "seed")),
    "seed at int64 max": (chat('"seed":9223372036854775807'), OK),
    "deep nesting": (chat(f'"x":{DEEP}'), (400, "invalid_json", "x")),
    "nesting past the recursion limit": (chat(f'"x":{ABYSS}'), (400, "invalid_json", None)),
    "duplicate key": (chat('"max_tokens":3'), (400, "invalid_json", "max_tokens")),
    "body is an array": ("[]", (400, "invalid_json", None)),
    "body is a string": ('"hi"', (400, "invalid_json", None)),
    "body is null": ("null", (400, "invalid_json", None)),
    "body is a number": ("1", (400, "invalid_json", None)),
    "empty body": ("", (400, "invalid_json", None)),
    "truncated": (chat()[:-1], (400, "invalid_json", None)),
    "UTF-8 BOM": (b"\xef\xbb\xbf" + chat().encode(), (400, "invalid_json", None)),
    "NUL and control escapes": (chat(content=r'"a\u0000\u0001\u001f\u007f\u0085b"'), OK),
    "noncharacters": (chat(content=r'"\ufffe\uffff\ufdd0"'), OK),
    "escaped pair": (chat(content=r'"\ud83d\ude00"'), OK),
    "special token text": (chat(content='"<|eot_id|><|start_header_id|>"'), OK),
}

RESPONSES_CASES: dict[str, tuple[str | bytes, tuple[int, str | None, str | None]]] = {
    "lone surrogate input": (resp(input=r'"\ud800"'), (400, "invalid_value", "input")),
    "surrogate in a message": (
        resp(input=r'[{"role":"user","content":[{"type":"input_text","text":"\udfff"}]}]'),
        (400, "invalid_value", "input[0].content[0].text"),
    ),
    "surrogate in instructions": (resp(r'"instructions":"\ud800"'), (400, "invalid_value", "instructions")),
    "surrogate in a metadata value": (
        resp(r'"metadata":{"k":"\ud800"}'),
        (400, "invalid_value", "metadata.k"),
    ),
    "surrogate in a metadata key": (resp(r'"metadata":{"\ud800":"v"}'), (400, "invalid_value", "metadata")),
    "NaN temperature": (resp('"temperature":NaN'), (400, "invalid_json", "temperature")),
    "int past 4300 digits": (resp(f'"top_p":{HUGE_INT}'), (400, "invalid_value", "top_p")),
    "nesting past the recursion limit": (resp(f'"x":{ABYSS}'), (400, "invalid_json", None)),
    "text.format a string": (resp('"text":{"format":"json"}'), (400, "invalid_value", "text.format")),
    "text.format a list": (resp('"text":{"format":["json"]}'), (400, "invalid_value", "text.format")),
    "empty input list": (resp(input="[]"), (400, "invalid_value", "input")),
    "body is an array": ("[1]", (400, "invalid_json", None)),
    "NUL in input": (resp(input=r'"a\u0000b"'), OK),
    "NUL in metadata": (resp(r'"metadata":{"\u0000":"\u0000"}'), OK),
}

CHAT_MODES = {"blocking": "", "stream": '"stream":true,'}
RESPONSES_MODES = {"blocking": "", "stream": '"stream":true,', "background": '"background":true,'}


def in_mode(body: str | bytes, mode: str) -> str | bytes:
    """The body with the mode's fields first, when it is a JSON object in text form."""
    if isinstance(body, str) and body.startswith("{") and mode:
        return "{" + mode + body[1:]
    return body


def table(cases: dict[str, Any], modes: dict[str, str]) -> list[Any]:
    return [
        pytest.param(in_mode(body, flag), expect, id=f"{mode}: {name}")
        for name, (body, expect) in cases.items()
        for mode, flag in modes.items()
    ]


def assert_answer(answer: Answer, expect: tuple[int, str | None, str | None]) -> None:
    status, code, param = expect
    assert answer.status == status, answer.body
    if status >= 400:
        error = answer.body["error"]
        assert (error["code"], error["param"]) == (code, param), error
        assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(("body", "expect"), table(CHAT_CASES, CHAT_MODES))
def test_chat_table(http: httpx.Client, store: redis.Redis, body: str | bytes, expect: Any) -> None:
    assert_answer(call(http, store, "POST", CHAT, body, headers={"content-type": JSON}), expect)


@pytest.mark.parametrize(("body", "expect"), table(RESPONSES_CASES, RESPONSES_MODES))
def test_responses_table(http: httpx.Client, store: redis.Redis, body: str | bytes, expect: Any) -> None:
    assert_answer(call(http, store, "POST", RESPONSES, body, headers={"content-type": JSON}), expect)


CONTENT_TYPES = {
    "text/plain": ({"content-type": "text/plain"}, (415, "unsupported_media_type", None)),
    "form": ({"content-type": "application/x-www-form-urlencoded"}, (415, "unsupported_media_type", None)),
    "missing": ({}, (415, "unsupported_media_type", None)),
    "no subtype": ({"content-type": "json"}, (415, "unsupported_media_type", None)),
    "json with charset": ({"content-type": "application/json; charset=utf-8"}, OK),
    "+json suffix": ({"content-type": "application/vnd.llmq+json"}, OK),
}


@pytest.mark.parametrize("path", [CHAT, RESPONSES])
@pytest.mark.parametrize(("headers", "expect"), CONTENT_TYPES.values(), ids=CONTENT_TYPES.keys())
def test_content_types(
    http: httpx.Client, store: redis.Redis, path: str, headers: dict[str, str], expect: Any
) -> None:
    body = chat() if path == CHAT else resp()
    assert_answer(call(http, store, "POST", path, body.encode(), headers=headers), expect)


NOT_FOUND = (404, "not_found", "response_id")
ODD_IDS = {
    "NUL": "%00",
    "invalid UTF-8": "%ff%fe",
    "CESU-8 surrogate": "%ed%a0%80",
    "dot dot": "..%2F..%2Fhealth",
    "encoded slash": "resp_%2F",
    "unicode": quote("résumé-😀"),
    "very long": "resp_" + "a" * 8000,
    "upper-case hex": "resp_" + "A" * 32,
    "glob": "resp_*",
    "newline": "resp_%0d%0aSet-Cookie:x",
}


def _id_routes(segment: str) -> list[tuple[str, str]]:
    return [
        ("GET", f"{RESPONSES}/{segment}"),
        ("GET", f"{RESPONSES}/{segment}?stream=true&starting_after=0"),
        ("POST", f"{RESPONSES}/{segment}/cancel"),
    ]


@pytest.mark.parametrize("segment", ODD_IDS.values(), ids=ODD_IDS.keys())
def test_odd_ids_are_404(http: httpx.Client, store: redis.Redis, segment: str) -> None:
    for method, path in _id_routes(segment):
        answer = call(http, store, method, path)
        assert answer.status == 404, (path, answer.body)
        assert answer.body["error"]["code"] == "not_found"
    answer = call(http, store, "GET", f"/v1/models/{segment}")
    # A segment with a newline matches no route at all (Starlette's path pattern stops there).
    assert (answer.status, answer.body["error"]["code"]) in ((404, "model_not_found"), (404, "not_found"))


@pytest.mark.parametrize("suffix", [":log", ":events", ":lease", ":cancel", "x", "%00"])
def test_a_real_id_with_a_suffix_is_404(
    http: httpx.Client, store: redis.Redis, done_response: str, suffix: str
) -> None:
    # The key for "resp_X:log" would be the job's event list: never build a key from an id unchecked.
    for method, path in _id_routes(done_response + suffix):
        answer = call(http, store, method, path)
        assert (answer.status, answer.body["error"]["code"]) == NOT_FOUND[:2], (path, answer.body)


@pytest.mark.parametrize(
    ("query", "expect"),
    [
        ("stream=true&starting_after=99999999999999999999", (400, "invalid_value", "starting_after")),
        ("stream=true&starting_after=-2", (400, "invalid_value", "starting_after")),
        ("stream=true&starting_after=NaN", (400, "invalid_value", "starting_after")),
        ("stream=maybe", (400, "invalid_value", "stream")),
        ("stream=true&starting_after=3", OK),
    ],
)
def test_resume_query(
    http: httpx.Client, store: redis.Redis, done_response: str, query: str, expect: Any
) -> None:
    assert_answer(call(http, store, "GET", f"{RESPONSES}/{done_response}?{query}"), expect)


@pytest.mark.parametrize(
    ("method", "path", "expect"),
    [
        ("GET", CHAT, (405, "method_not_allowed", None)),
        ("PUT", RESPONSES, (405, "method_not_allowed", None)),
        ("DELETE", f"{RESPONSES}/resp_{'0' * 32}/cancel", (405, "method_not_allowed", None)),
        ("DELETE", f"{RESPONSES}/resp_{'0' * 32}", NOT_FOUND),  # a stored response may be deleted
        ("GET", "/v1/nothing/here", (404, "not_found", None)),
        ("GET", f"{RESPONSES}/resp_{'0' * 32}", NOT_FOUND),
        ("POST", f"{RESPONSES}/resp_{'0' * 32}/cancel", NOT_FOUND),
    ],
)
def test_routes_and_methods(
    http: httpx.Client, store: redis.Redis, method: str, path: str, expect: Any
) -> None:
    assert_answer(call(http, store, method, path), expect)


# --- x-request-id, through the official SDK ----------------------------------------------------


@pytest.fixture(scope="module")
def sdk(hostile: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{hostile.api_url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_request_id_is_the_job_id(sdk: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "Hi"}]
    completion = sdk.chat.completions.create(
        messages=messages, max_tokens=1, model=sdk.models.list().data[0].id
    )
    assert completion._request_id == completion.id
    raw = sdk.chat.completions.with_raw_response.create(
        messages=messages, max_tokens=1, model=completion.model, stream=True
    )
    chunks = list(raw.parse())
    assert raw.headers["x-request-id"] == chunks[0].id
    response = sdk.responses.create(input="Hi", max_output_tokens=1, model=completion.model)
    assert response._request_id == response.id
    background = sdk.responses.create(
        input="Hi", max_output_tokens=1, model=completion.model, background=True
    )
    assert background._request_id == background.id
    assert sdk.responses.retrieve(background.id)._request_id == background.id


def test_errors_carry_a_request_id_found_in_the_log(hostile: Stack, sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.chat.completions.create(messages=[], model="x")
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.responses.retrieve("resp_" + "0" * 32)
    ids = [bad.value.request_id, missing.value.request_id]
    for request_id in ids:
        assert request_id and re.fullmatch(r"req_[0-9a-f]{32}", request_id), request_id
    assert len(set(ids)) == 2
    deadline = time.monotonic() + 5
    while not all(i in hostile.api.log_path.read_text() for i in ids) and time.monotonic() < deadline:
        time.sleep(0.1)
    log = hostile.api.log_path.read_text()
    assert all(i in log for i in ids), ids


def test_every_route_answers_with_a_request_id(http: httpx.Client) -> None:
    for path in ("/health", "/metrics", "/", "/v1/models", "/openapi.json", "/nowhere"):
        r = http.get(path)
        assert REQUEST_ID.fullmatch(r.headers.get("x-request-id", "")), (path, r.headers)


# --- property: generated JSON text mutated into valid bodies ----------------------------------

# Any UTF-16 code unit as an escape (lone surrogates included), the short escapes, raw characters
# (raw control characters too, which JSON forbids), and the surrogate edges more often.
_unit = st.one_of(
    st.integers(0, 0xFFFF).map(lambda u: f"\\u{u:04x}"),
    st.sampled_from(["\\ud800", "\\udfff", "\\ud83d\\ude00", "\\udbff\\udfff", "\\u0000"]),
    st.sampled_from(['\\"', "\\\\", "\\/", "\\b", "\\f", "\\n", "\\r", "\\t"]),
    st.characters(exclude_categories=["Cs"], exclude_characters='"\\'),
)
json_strings = st.lists(_unit, max_size=6).map(lambda units: '"' + "".join(units) + '"')
json_numbers = st.one_of(
    st.integers(-5, 5).map(str),
    st.integers().map(str),
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.integers(-400, 400).map(lambda e: f"1e{e}"),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "-0", "0.0", "1E400", "-1e400", HUGE_INT, "2", "0.5"]),
)
json_leaves = st.one_of(json_strings, json_numbers, st.sampled_from(["true", "false", "null"]))
json_values = st.recursive(
    json_leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=3).map(lambda xs: "[" + ",".join(xs) + "]"),
        st.lists(st.tuples(json_strings, children), max_size=3).map(
            lambda kvs: "{" + ",".join(f"{k}:{v}" for k, v in kvs) + "}"
        ),
    ),
    max_leaves=5,
)
hostile_values = st.one_of(
    json_strings,  # strings first: the fields that reach the job record, Redis and the tokenizer
    json_strings.map(lambda s: f'[{{"type":"text","text":{s}}}]'),
    json_numbers,
    json_values,
    st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),
)

CHAT_FIELDS = {
    "messages": '[{"role":"user","content":"Hi"}]',
    "max_tokens": "2",
    "temperature": "0",
    "top_p": "0.9",
    "model": None,
    "stop": None,
    "seed": None,
    "user": None,
    "stream_options": None,
    "response_format": None,
    "max_completion_tokens": None,
    "n": None,
    "ignore_eos": None,
}
RESPONSES_FIELDS = {
    "input": '"Hi"',
    "max_output_tokens": "2",
    "temperature": "0",
    "top_p": "0.9",
    "model": None,
    "instructions": None,
    "metadata": None,
    "text": None,
    "store": None,
    "tools": None,
    "ignore_eos": None,
}


Mutation = tuple[str, str, str]  # (field name or <content>/<key>/<duplicate>, value, key)


def mutated_body(fields: dict[str, str | None], mutations: list[Mutation]) -> str:
    """The valid body with each mutation applied: a field set to a hostile value, the message
    content replaced, or a hostile key added (twice, for a duplicate)."""
    pairs = [(f'"{k}"', v) for k, v in fields.items() if v is not None]
    for name, value, key in mutations:
        if name == "<content>":
            # messages, or input: a message list whose content is `value`
            pairs[0] = (pairs[0][0], f'[{{"role":"user","content":{value}}}]')
        elif name == "<key>":
            pairs.append((key, value))
        elif name == "<duplicate>":
            pairs += [pairs[0], (key, value), (key, value)]
        else:
            pairs = [(k, v) for k, v in pairs if k != f'"{name}"'] + [(f'"{name}"', value)]
    return "{" + ",".join(f"{k}:{v}" for k, v in pairs) + "}"


def mutations(fields: dict[str, str | None]) -> st.SearchStrategy[str]:
    names = st.sampled_from([*fields, "<content>", "<content>", "<content>", "<key>", "<duplicate>"])
    one = st.tuples(names, hostile_values, json_strings)
    return st.lists(one, min_size=1, max_size=3).map(lambda ms: mutated_body(fields, ms))


HYPOTHESIS = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)


GENERATED = [
    pytest.param(path, fields, flag, id=f"{name} {mode}")
    for name, path, fields, modes in (
        ("chat", CHAT, CHAT_FIELDS, CHAT_MODES),
        ("responses", RESPONSES, RESPONSES_FIELDS, RESPONSES_MODES),
    )
    for mode, flag in modes.items()
]


@pytest.mark.parametrize(("path", "fields", "mode"), GENERATED)
def test_generated_bodies(
    http: httpx.Client, store: redis.Redis, path: str, fields: dict[str, str | None], mode: str
) -> None:
    @given(body=mutations(fields))
    @HYPOTHESIS
    def check(body: str) -> None:
        call(http, store, "POST", path, in_mode(body, mode), headers={"content-type": JSON})

    check()


# A path segment as a hostile client writes it: percent-escapes of any byte, raw text, or a real
# id with something after it.
segments = st.one_of(
    st.lists(st.integers(0, 255), max_size=40).map(lambda bs: "".join(f"%{b:02x}" for b in bs)),
    st.text(max_size=40).map(lambda s: quote(s, safe="")),
    st.text(alphabet="0123456789abcdefABCDEF:_.-", max_size=40).map(lambda s: "resp_" + s),
)


def test_id_routes_generated(http: httpx.Client, store: redis.Redis, done_response: str) -> None:
    @given(segment=segments, real=st.booleans(), after=st.one_of(st.integers().map(str), json_strings))
    @HYPOTHESIS
    def check(segment: str, real: bool, after: str) -> None:
        segment = (done_response + segment) if real and segment else segment or "x"
        for method, path in [
            *_id_routes(segment),
            ("GET", f"{RESPONSES}/{segment}?stream=true&starting_after={quote(after, safe='')}"),
            ("GET", f"/v1/models/{segment}"),
        ]:
            answer = call(http, store, method, path)
            assert answer.status in (400, 404), (path, answer.body)

    check()


def test_no_traceback_in_the_api_log(hostile: Stack) -> None:
    # Runs last in this module: nothing above made the API log an unhandled error.
    log = hostile.api.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "unhandled error" not in log
