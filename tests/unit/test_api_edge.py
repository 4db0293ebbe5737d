"""The API's edge, as pure functions: the strict JSON parse and the error mapping (no processes)."""

from __future__ import annotations

from typing import Any

import pytest

from api import errors
from api.edge import body

SURROGATE = "lone UTF-16 surrogate"


def refused(raw: bytes) -> dict[str, Any]:
    with pytest.raises(errors.InvalidRequest) as caught:
        body.parse(raw)
    error: dict[str, Any] = caught.value.body()["error"]
    return error


@pytest.mark.parametrize(
    ("raw", "code", "param", "says"),
    [
        (rb'{"a":"\ud800"}', "invalid_value", "a", SURROGATE),
        (rb'{"a":[{"b":"x\udfffy"}]}', "invalid_value", "a[0].b", SURROGATE),
        (rb'{"m":{"\ud800":"v"}}', "invalid_value", "m", SURROGATE),
        (rb'{"a":NaN}', "invalid_json", "a", "NaN"),
        (rb'{"a":[1,-Infinity]}', "invalid_json", "a[1]", "-Infinity"),
        (rb'{"a":1e400}', "invalid_value", "a", "double"),
        (b'{"a":' + b"9" * 5000 + b"}", "invalid_value", "a", "64-bit"),
        (b'{"a":9223372036854775808}', "invalid_value", "a", "64-bit"),
        (b'{"a":-9223372036854775809}', "invalid_value", "a", "64-bit"),
        (b'{"a":1,"b":{"c":1,"c":2}}', "invalid_json", "b.c", "twice"),
        (b'{"x":' + b"[" * 80 + b"]" * 80 + b"}", "invalid_json", "x", "64 levels"),
        (b"[" * 100_000, "invalid_json", None, "levels"),
        (b'{"a":"\xff"}', "invalid_json", None, "UTF-8"),
        (b'{"a":"\xed\xa0\x80"}', "invalid_json", None, "UTF-8"),
        (b'\xef\xbb\xbf{"a":1}', "invalid_json", None, "not valid JSON"),
        (b'{"a":"\x01"}', "invalid_json", None, "control character"),
        (b"[]", "invalid_json", None, "JSON object"),
        (b"null", "invalid_json", None, "JSON object"),
    ],
)
def test_refused(raw: bytes, code: str, param: str | None, says: str) -> None:
    error = refused(raw)
    assert (error["code"], error["param"]) == (code, param)
    assert says in error["message"]
    error["message"].encode("utf-8")  # renderable: nothing of the input that cannot be encoded


def test_accepted_values_are_kept() -> None:
    raw = rb'{"a":"\ud83d\ude00\u0000\uffff","n":9223372036854775807,"m":-9223372036854775808,"f":1e-400}'
    assert body.parse(raw) == {"a": "\U0001f600\x00\uffff", "n": 2**63 - 1, "m": -(2**63), "f": 0.0}
    assert body.parse(b'{"x":' + b"[" * 62 + b"]" * 62 + b"}")


@pytest.mark.parametrize(
    ("content_type", "is_json"),
    [
        ("application/json", True),
        ("application/json; charset=utf-8", True),
        ("application/vnd.api+json", True),
        ("text/plain", False),
        ("application/x-www-form-urlencoded", False),
        ("json", False),
        (None, False),
    ],
)
def test_content_types(content_type: str | None, is_json: bool) -> None:
    assert body.is_json(content_type) is is_json


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (404, "not_found"),
        (405, "method_not_allowed"),
        (400, "bad_request"),
        (415, "unsupported_media_type"),
        (599, "http_599"),
    ],
)
def test_every_http_error_has_a_code(status: int, code: str) -> None:
    error = errors.from_http_exception(status, "detail")
    assert (error.status, error.code) == (status, code)


@pytest.mark.parametrize(
    ("loc", "param"),
    [
        (("body", "messages", 0, "content"), "messages[0].content"),
        (("body", "messages", 0, "content", "str"), "messages[0].content"),
        (("body", "input", "list[InputMessage]", 0), "input"),
        (("query", "starting_after"), "starting_after"),
        (("body",), None),
    ],
)
def test_param_names(loc: tuple[int | str, ...], param: str | None) -> None:
    assert errors._param_from_loc(loc) == param


def test_no_error_is_without_a_code() -> None:
    classes = [errors.APIError, *_subclasses(errors.APIError)]
    assert all(isinstance(cls("m").code, str) and cls("m").code for cls in classes)


def test_messages_quoting_unencodable_text_still_render() -> None:
    error = errors.NotFound("No response with id '\ud800'.")
    assert "\\ud800" in error.body()["error"]["message"]


def _subclasses(cls: type) -> list[type]:
    return [sub for direct in cls.__subclasses__() for sub in (direct, *_subclasses(direct))]
