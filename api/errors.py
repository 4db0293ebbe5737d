"""The service's one error shape and the mapping from domain errors to HTTP statuses.

Every error leaves as `{"error": {"message", "type", "param", "code"}}`, OpenAI's shape, so the
official SDKs raise their typed exceptions (BadRequestError, NotFoundError, ...) for them.

    APIError                      base: status, type, code, param
    +-- InvalidRequest            400 invalid_request_error (bad JSON, bad or unsupported field)
    |                                 code=invalid_json | invalid_value | missing_required_parameter
    |                                 | unsupported_parameter
    |   +-- ContextLengthExceeded 400 code=context_length_exceeded
    |   +-- TooManyMessages       400 code=too_many_messages (over MAX_MESSAGES)
    |   +-- MaxTokensTooLarge     400 code=max_tokens_too_large (over MAX_TOKENS_LIMIT)
    +-- InvalidAPIKey             401 code=invalid_api_key (API_KEYS set, key missing or wrong)
    +-- ModelNotFound             404 code=model_not_found
    +-- NotFound                  404 code=not_found (unknown route or id, or another key's job)
    +-- (Starlette's HTTPException) 405 code=method_not_allowed, any other status its phrase
    +-- Conflict                  409 code=batch_not_cancellable (a batch finalizing or ended)
    +-- RequestTooLarge           413 code=request_too_large (body over MAX_REQUEST_BYTES)
    +-- UnsupportedMediaType      415 code=unsupported_media_type (a body that is not JSON)
    +-- QueueFull                 429 code=queue_full (MAX_QUEUED jobs waiting); sets Retry-After
    +-- RateLimited               429 code=rate_limit_exceeded, type=requests | tokens (a key over
    |                                 REQUESTS_/TOKENS_PER_MINUTE_PER_KEY); Retry-After, retry-after-ms
    +-- KeyShareFull              429 type=requests code=rate_limit_exceeded (the key has
    |                                 MAX_QUEUED_PER_KEY waiting or MAX_RUNNING_PER_KEY running);
    |                                 sets Retry-After
    +-- ServiceUnavailable        503 (Redis down, queue refused the job); sets Retry-After
    |   +-- ModelUnavailable      503 code=model_unavailable (a known model with no worker now)
    +-- ClientDisconnected        499 code=client_closed_request (the client went away)
    +-- GenerationFailed          500 code=generation_failed, or the worker's failure code
    +-- (APIError itself)         500 code=internal_error (a bug: logged with its traceback)
    +-- Timeout                   504 code=timeout (no terminal event within the request timeout)

Every error has a code; any other status Starlette raises gets one from its reason phrase
(`HTTPStatus(...).phrase`, snake_cased), so clients can always branch on it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from http import HTTPStatus
from typing import Any, Literal

import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.edge import request_ids
from tasks import client as queue

log = logging.getLogger(__name__)


class APIError(Exception):
    status = 500
    type = "server_error"
    code: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        # Messages quote what the client sent; keep whatever they quote encodable as UTF-8.
        return {"error": {k: _printable(v) for k, v in error.items()}}

    # Errors a client should retry later say when, in a Retry-After header.
    retry_after_seconds: int | None = None

    def headers(self) -> dict[str, str] | None:
        return None if self.retry_after_seconds is None else {"Retry-After": str(self.retry_after_seconds)}


class InvalidRequest(APIError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_value"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class TooManyMessages(InvalidRequest):
    code = "too_many_messages"


class MaxTokensTooLarge(InvalidRequest):
    code = "max_tokens_too_large"


class InvalidAPIKey(APIError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class Conflict(APIError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class RequestTooLarge(APIError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedMediaType(APIError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class NotFound(APIError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class ServiceUnavailable(APIError):
    status = 503
    type = "service_unavailable"
    code = "service_unavailable"
    retry_after_seconds = 5


class ModelUnavailable(ServiceUnavailable):
    code = "model_unavailable"

    def __init__(self, message: str, *, retry_after: int = ServiceUnavailable.retry_after_seconds) -> None:
        super().__init__(message, param="model")
        self.retry_after_seconds = retry_after


class QueueFull(APIError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"
    retry_after_seconds = 2


class RateLimited(APIError):
    """A key over its requests or tokens per minute (api/edge/rate_limits.py). The type names the
    limit, as OpenAI's; retry-after-ms is what the openai SDKs wait by, before Retry-After."""

    status = 429
    code = "rate_limit_exceeded"

    def __init__(
        self, message: str, *, limit: Literal["requests", "tokens"] = "requests", retry_after: float = 1.0
    ) -> None:
        super().__init__(message)
        self.type = limit
        self.retry_after_ms = max(1, math.ceil(retry_after * 1000))
        self.retry_after_seconds = max(1, math.ceil(retry_after))

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_seconds), "retry-after-ms": str(self.retry_after_ms)}


class KeyShareFull(APIError):
    """A key over its share of the queue (MAX_QUEUED_PER_KEY, MAX_RUNNING_PER_KEY). OpenAI's
    type and code for a request-count limit, so the SDKs raise RateLimitError and retry it."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"
    retry_after_seconds = 1


class ClientDisconnected(APIError):
    # nginx's 499: nobody reads this response; it only shows in access logs.
    status = 499
    type = "invalid_request_error"
    code = "client_closed_request"


class GenerationFailed(APIError):
    status = 500
    type = "server_error"
    code = "generation_failed"


class Timeout(APIError):
    status = 504
    type = "timeout"
    code = "timeout"


# Worker failure codes answered as an HTTP error of their own: the client's fault (4xx), and a job
# a failover lost (503, submit again); any other code is a failed generation.
_FAILURE_TYPES: dict[str, type[APIError]] = {
    "context_length_exceeded": ContextLengthExceeded,
    "model_not_found": ModelNotFound,
    # The worker's llguidance refused a grammar the API's accepted (a version skew between them).
    "invalid_grammar": InvalidRequest,
    # Only the worker knows its model's vocabulary.
    "invalid_logit_bias": InvalidRequest,
    # A Redis failover lost the job's record (tasks/client.py LOST): worth submitting again.
    "job_lost": ServiceUnavailable,
}
_FAILURE_PARAMS = {"invalid_logit_bias": "logit_bias"}


def is_request_failure(code: str) -> bool:
    """Whether a job's failure code is answered as its own HTTP error (the request's fault, or a
    lost job) rather than as a failed generation (a failed Response, or a 500)."""
    return code in _FAILURE_TYPES


def from_failure(code: str, message: str) -> APIError:
    """The API error for a job's `failed` event."""
    return _FAILURE_TYPES.get(code, GenerationFailed)(message, code=code, param=_FAILURE_PARAMS.get(code))


def _printable(value: str | None) -> str | None:
    return None if value is None else value.encode("utf-8", "backslashreplace").decode("utf-8")


def param_name(path: Sequence[int | str]) -> str | None:
    """A field's location as OpenAI writes `param`: messages[0].content."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or None


# Where the value came from, as FastAPI prefixes the location; `param` names the field alone.
_SOURCES = frozenset({"body", "query", "path", "header", "cookie"})
# Location parts pydantic adds for union members and validators ("str", "list[TextPart]", ...).
_UNION_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})


def _param_from_loc(loc: tuple[int | str, ...]) -> str | None:
    parts = list(loc[1:] if loc and loc[0] in _SOURCES else loc)
    # Pydantic appends the union member or validator name to the location; drop those tails.
    for i, part in enumerate(parts):
        if isinstance(part, str) and (part in _UNION_TAGS or "[" in part):
            parts = parts[:i]
            break
    return param_name(parts)


def validation_error(problems: Sequence[Any]) -> InvalidRequest:
    """One 400 for pydantic's list of problems: the most specific one, named by its param."""
    if any(p.get("type") == "json_invalid" for p in problems):
        return InvalidRequest("The request body is not valid JSON.", code="invalid_json")
    # With unions (content: str | list[parts]) every branch reports; the deepest is the useful one.
    first = max(problems, key=lambda p: len(p.get("loc", ())))
    loc = tuple(first.get("loc", ()))
    if loc in ((), ("body",)):
        return InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    param = _param_from_loc(loc)
    code = "missing_required_parameter" if first.get("type") == "missing" else "invalid_value"
    message = str(first.get("msg", "Invalid value."))
    return InvalidRequest(f"{param}: {message}" if param else message, param=param, code=code)


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def on_api_error(_: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(validation_error(exc.errors()))

    @app.exception_handler(redis.exceptions.RedisError)
    async def on_redis_error(_: Request, exc: redis.exceptions.RedisError) -> JSONResponse:
        # Redis is the queue and the job store: without it nothing can be answered, only retried.
        log.warning("Redis unavailable: %s", exc)
        return _error_response(ServiceUnavailable("The queue is unavailable; try again shortly."))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_response(from_http_exception(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        response = _error_response(APIError("The server had an error while processing your request."))
        # Starlette answers this one outside every middleware, so the request id is added here.
        response.headers[request_ids.HEADER] = request_ids.current()
        return response


def from_http_exception(status: int, detail: str) -> APIError:
    """An error Starlette or FastAPI raised (no route, wrong method, ...) in our shape, with a code."""
    error = APIError(detail)
    error.status = status
    error.type = "invalid_request_error" if status < 500 else "server_error"
    known = {404: NotFound.code, 405: "method_not_allowed", 413: RequestTooLarge.code}
    try:
        fallback = HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        fallback = f"http_{status}"
    error.code = known.get(status, fallback)
    return error


def sse_error(error: APIError) -> str:
    """The in-band form of an error after a stream has started."""
    return json.dumps(error.body(), ensure_ascii=False)


@contextmanager
def queue_errors() -> Iterator[None]:
    """Enqueueing failures as API errors: a full queue is 429, a queue that is away is 503."""
    try:
        yield
    except queue.QueueFull as exc:
        raise QueueFull("Too many requests are waiting; retry shortly.") from exc
    except queue.KeyShareFull as exc:
        limit = "MAX_QUEUED_PER_KEY" if exc.limit == "queued" else "MAX_RUNNING_PER_KEY"
        raise KeyShareFull(f"Rate limit reached: {exc} ({limit}={exc.count}); retry shortly.") from exc
    except (redis.exceptions.RedisError, queue.EnqueueFailed, OSError) as exc:
        raise ServiceUnavailable("The queue is unavailable; try again shortly.") from exc
