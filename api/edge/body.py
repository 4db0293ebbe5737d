"""The edge for request bodies: strict JSON, or a 400/415 naming what cannot be represented.

Python's json module accepts more than JSON and more than the rest of the service can carry:
NaN and Infinity, lone UTF-16 surrogates from `\\ud800` escapes (they cannot be encoded as
UTF-8, so the job record, Redis and the logs would all fail on them), numbers past float and
64-bit ranges, duplicate keys (last one wins), and nesting deep enough to exhaust the stack. One
parse here refuses all of them, for every field of every endpoint, before any model sees the
body; nothing is replaced. FastAPI's own parse would turn some of these into a 400 without a
code, and let the others through.
"""

from __future__ import annotations

import email.message
import json
import math
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect

from api import errors

MAX_DEPTH = 64  # far beyond any OpenAI request (a chat body nests 5 deep); the stack stays safe
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Longest int literal that can be within int64 ("-9223372036854775808"); longer ones are not
# converted at all, so a 5,000-digit literal costs nothing (and never hits Python's 4,300 cap).
_INT64_DIGITS = 20

Path = tuple[str | int, ...]


class _Refused:
    """Stands in for a value the parser met that the service refuses; found by the walk."""

    def __init__(self, code: str, reason: str, key: str | None = None) -> None:
        self.code, self.reason, self.key = code, reason, key


class _Object(dict[str, Any]):
    """A JSON object, remembering a key that appeared twice."""

    duplicate: str | None = None


def _int(literal: str) -> int | _Refused:
    value = int(literal) if len(literal) <= _INT64_DIGITS else None
    if value is None or not INT64_MIN <= value <= INT64_MAX:
        return _Refused("invalid_value", "is an integer beyond the signed 64-bit range")
    return value


def _float(literal: str) -> float | _Refused:
    value = float(literal)
    return value if math.isfinite(value) else _Refused("invalid_value", "is a number beyond a double's range")


def _constant(name: str) -> _Refused:
    return _Refused("invalid_json", f"is {name}, which JSON has no literal for")


def _object(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                obj.duplicate = key
                break
            seen.add(key)
    return obj


def is_text(value: str) -> bool:
    """Whether the string is Unicode text (no lone surrogates), so it can be encoded as UTF-8."""
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _refuse(path: Path, code: str, reason: str) -> errors.InvalidRequest:
    param = errors.param_name(path)
    subject = f"'{param}'" if param else "The request body"
    return errors.InvalidRequest(f"{subject} {reason}.", param=param, code=code)


def _check(document: Any) -> None:
    """Walk the parsed document (iteratively: its depth is what is being checked) in order."""
    stack: list[tuple[Any, Path]] = [(document, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, _Refused):
            raise _refuse(path, value.code, value.reason)
        if isinstance(value, str) and not is_text(value):
            raise _refuse(path, "invalid_value", "contains a lone UTF-16 surrogate (not Unicode text)")
        if isinstance(value, dict | list) and len(path) >= MAX_DEPTH:
            # Named by its outermost field: the full path would be the nesting itself.
            raise _refuse(path[:1], "invalid_json", f"nests deeper than {MAX_DEPTH} levels")
        if isinstance(value, list):
            stack += [(item, (*path, i)) for i, item in reversed(list(enumerate(value)))]
        elif isinstance(value, _Object):
            if value.duplicate is not None:
                key_path = (*path, value.duplicate) if is_text(value.duplicate) else path
                raise _refuse(key_path, "invalid_json", "appears twice as a key")
            for key in value:
                if not is_text(key):
                    raise _refuse(path, "invalid_value", "has a key with a lone UTF-16 surrogate")
            stack += [(item, (*path, key)) for key, item in reversed(value.items())]


def parse(body: bytes) -> Any:
    """The body as JSON, refused (errors.InvalidRequest) unless every value can be carried."""
    try:
        text = body.decode("utf-8")  # strict: RFC 8259 JSON is UTF-8, and surrogates are not
    except UnicodeDecodeError:
        raise errors.InvalidRequest("The request body is not valid UTF-8.", code="invalid_json") from None
    try:
        document = json.loads(
            text, parse_int=_int, parse_float=_float, parse_constant=_constant, object_pairs_hook=_object
        )
    except json.JSONDecodeError as exc:
        message = f"The request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})."
        raise errors.InvalidRequest(message, code="invalid_json") from None
    except RecursionError:
        message = f"The request body nests deeper than {MAX_DEPTH} levels."
        raise errors.InvalidRequest(message, code="invalid_json") from None
    _check(document)
    if not isinstance(document, dict):
        raise errors.InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    return document


def is_json(content_type: str | None) -> bool:
    """FastAPI's rule (strict_content_type): application/json or application/*+json."""
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


class StrictJSONRequest(Request):
    """A request whose `json()` is the strict parse above."""

    async def json(self) -> Any:
        if not hasattr(self, "_strict_json"):
            self._strict_json = parse(await self.body())
        return self._strict_json

    async def check_body(self) -> None:
        """Parse now, so a refusal is our error: inside FastAPI's parse it would become a bare 400."""
        try:
            body = await self.body()
        except ClientDisconnect:
            raise errors.ClientDisconnected("The client closed the request.") from None
        if not body:
            return  # the model reports the missing body
        if not is_json(self.headers.get("content-type")):
            raise errors.UnsupportedMediaType(
                "Send the request body as JSON, with 'Content-Type: application/json'."
            )
        await self.json()


class StrictJSONRoute(APIRoute):
    """The route class of every endpoint that takes a JSON body."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def strict_handler(request: Request) -> Response:
            strict = StrictJSONRequest(request.scope, request.receive)
            await strict.check_body()
            return await handler(strict)

        return strict_handler
