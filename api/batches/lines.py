"""A batch's input file, validated as OpenAI does it, and its lines' answers as output lines.

Two levels, as OpenAI's Batch API: a file that is not JSONL, a line whose `url` is not the
batch's endpoint, a duplicate `custom_id`, or `stream: true` fails the whole batch at
`validating`, with `errors` naming the lines. A line that passes is then checked exactly as its
endpoint checks a request (the same strict parse, models and limits); one the endpoint would
refuse goes to the error file with the status and error body the endpoint would have sent.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from api import errors
from api.chat_completion import serving as chat
from api.chat_completion.protocol import ChatCompletionRequest
from api.edge import body as strict_json
from api.edge import request_ids
from api.responses import conversations
from api.responses import serving as responses
from api.responses.protocol import ResponseCreateRequest
from api.serving import caps, routing
from tasks import events, jobs
from tasks.batches import LINE_JOB_ID, Line, LineError
from tasks.registry import Models
from tasks.settings import Settings

# A batch that fails validation lists at most this many problems (OpenAI lists a sample too).
MAX_REPORTED_ERRORS = 100
MAX_CUSTOM_ID_CHARS = 512


@dataclass
class ParsedInput:
    lines: list[Line] = field(default_factory=list)
    refused: dict[int, str] = field(default_factory=dict)  # line index -> its error-file line
    errors: list[LineError] = field(default_factory=list)  # set: the batch fails validation


def count_lines(content: bytes) -> int:
    """Non-blank lines, cheaply: the limit on lines is checked before a batch is created."""
    return sum(1 for raw in content.splitlines() if raw.strip())


# What each previous_response_id the lines name continues (api/responses/serving.py
# conversation()), read before the lines are parsed, or the error a request naming it would get.
Histories = Mapping[str, "list[jobs.Message] | errors.APIError"]


def previous_response_ids(content: bytes) -> set[str]:
    """The previous_response_id values the lines of a /v1/responses batch name, to be read before
    parse_input() (which runs in a thread, away from Redis). Lines that are not JSON objects
    name none here; parse_input() refuses them."""
    found: set[str] = set()
    for raw in content.splitlines():
        try:
            line = json.loads(raw)
        except (ValueError, RecursionError):
            continue
        body = line.get("body") if isinstance(line, dict) else None
        previous = body.get("previous_response_id") if isinstance(body, dict) else None
        if isinstance(previous, str):
            found.add(previous)
    return found


def parse_input(
    content: bytes,
    endpoint: str,
    settings: Settings,
    models: Models,
    owner: str | None,
    histories: Histories | None = None,
) -> ParsedInput:
    """Validate the whole file; CPU-bound (run it in a thread). Each line goes to the model its
    body names, as a request would (a known model without workers now is fine: the line waits).
    `histories`: the conversations the lines' previous_response_id values continue."""
    out = ParsedInput()
    envelopes: list[tuple[int, bytes, str]] = []
    seen: set[str] = set()
    for number, raw in enumerate(content.splitlines(), start=1):
        if not raw.strip():
            continue  # blank lines (a trailing newline) carry no request
        problem = _envelope_problem(raw, endpoint, seen)
        if isinstance(problem, LineError):
            problem.line = number
            if len(out.errors) < MAX_REPORTED_ERRORS:
                out.errors.append(problem)
            continue
        envelopes.append((number, raw, problem))
    if not envelopes and not out.errors:
        out.errors.append(LineError(code="empty_file", message="The input file has no requests."))
    if out.errors:
        return out
    for index, (_, raw, custom_id) in enumerate(envelopes):
        try:
            job = _job_of(raw, endpoint, settings, models, owner, histories or {})
        except errors.APIError as exc:
            out.refused[index] = error_line(custom_id, exc)
            out.lines.append(Line(custom_id=custom_id))
        else:
            out.lines.append(Line(custom_id=custom_id, job=job))
    return out


def _envelope_problem(raw: bytes, endpoint: str, seen: set[str]) -> LineError | str:
    """What fails the batch about this line, or its custom_id if nothing does."""
    try:
        line = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, a huge integer, nesting too deep
        return LineError(code="invalid_json_line", message="This line is not valid JSON.")
    if not isinstance(line, dict):
        return LineError(code="invalid_json_line", message="This line is not a JSON object.")
    custom_id = line.get("custom_id")
    if (
        not isinstance(custom_id, str)
        or not custom_id
        or len(custom_id) > MAX_CUSTOM_ID_CHARS
        or not strict_json.is_text(custom_id)  # a lone surrogate cannot be written out again
    ):
        message = f"'custom_id' must be a string of 1 to {MAX_CUSTOM_ID_CHARS} characters."
        return LineError(code="invalid_custom_id", message=message, param="custom_id")
    if custom_id in seen:
        return LineError(
            code="duplicate_custom_id",
            message=f"The custom_id '{custom_id[:80]}' appears twice.",
            param="custom_id",
        )
    seen.add(custom_id)
    if line.get("method") != "POST":
        return LineError(code="invalid_method", message="'method' must be 'POST'.", param="method")
    if line.get("url") != endpoint:
        message = f"'url' must be the batch's endpoint, '{endpoint}'."
        return LineError(code="mismatched_url", message=message, param="url")
    request = line.get("body")
    if not isinstance(request, dict):
        return LineError(code="invalid_body", message="'body' must be a JSON object.", param="body")
    if request.get("stream") is True:
        return LineError(
            code="stream_unsupported", message="Batch requests cannot stream.", param="body.stream"
        )
    return custom_id


def _job_of(
    raw: bytes, endpoint: str, settings: Settings, models: Models, owner: str | None, histories: Histories
) -> jobs.NewJob:
    """The line's job, checked as its endpoint checks a request; raises the endpoint's error."""
    try:  # surrogates, NaN, duplicate keys...: the endpoint's own 400s
        request = strict_json.parse(raw)["body"]
    except errors.InvalidRequest as exc:
        raise _as_body_error(exc) from None
    max_tokens_default = caps.default_max_tokens(settings)
    try:
        if endpoint == "/v1/chat/completions":
            chat_request = ChatCompletionRequest.model_validate(request)
            chat.validate(chat_request, settings)
            model = routing.model_for(models, chat_request.model, can_wait=True)
            return chat_request.to_job(LINE_JOB_ID, model, max_tokens_default, owner=owner)
        response_request = ResponseCreateRequest.model_validate(request)
        responses.validate(response_request, settings)
        # A line is answered in the output file: it never runs as a background response.
        response_request = response_request.model_copy(update={"background": False})
        model = routing.model_for(models, response_request.model, can_wait=True)
        history = None
        if (previous := response_request.previous_response_id) is not None:
            earlier = histories.get(previous, responses.not_found(previous, "previous_response_id"))
            if isinstance(earlier, errors.APIError):
                raise earlier
            room = responses.history_room(response_request, settings)
            truncation = response_request.truncation or "disabled"
            history = conversations.fit_history(earlier, response_request.input_messages(), room, truncation)
        return response_request.to_job(LINE_JOB_ID, model, max_tokens_default, owner=owner, history=history)
    except ValidationError as exc:
        raise errors.validation_error(exc.errors()) from None


def _as_body_error(exc: errors.InvalidRequest) -> errors.InvalidRequest:
    """The refusal as the endpoint words it: its fields are named from the body, not the line."""
    param = exc.param
    if param is None or not param.startswith("body."):
        return exc
    inner = param.removeprefix("body.")
    message = exc.message.replace(f"'{param}'", f"'{inner}'")
    return errors.InvalidRequest(message, param=inner, code=exc.code)


def output_line(custom_id: str, job_id: str, status: int, body: dict[str, Any]) -> str:
    """A line of the output or error file for a request the endpoint answered."""
    line = {
        "id": "batch_req_" + job_id.split("-")[-1].split("_")[-1],
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": job_id, "body": body},
        "error": None,
    }
    return json.dumps(line, ensure_ascii=False)


def error_line(custom_id: str, error: errors.APIError) -> str:
    """The error-file line for a request the endpoint refused before it ran."""
    request_id = request_ids.new_request_id()
    return output_line(custom_id, request_id, error.status, error.body())


def unanswered_line(custom_id: str, code: str, message: str) -> str:
    """The error-file line for a request that never got an answer (cancelled, expired, lost)."""
    line = {
        "id": f"batch_req_{secrets.token_hex(16)}",
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }
    return json.dumps(line, ensure_ascii=False)


def answer(job: jobs.JobRecord, log: list[events.AnyEvent]) -> tuple[int, dict[str, Any]]:
    """What the endpoint would have answered for this job: its status code and body."""
    spec = job.spec
    if spec.kind == "response":
        view = responses.ResponseView(spec, job.meta, job.created_at)
        for event in log:
            view.apply(event)
        return 200, view.snapshot().model_dump(mode="json")
    chat_view = chat.ChatView.of(spec, int(job.created_at))
    try:
        for event in log:
            chat_view.apply(event)
    except errors.APIError as exc:
        return exc.status, exc.body()
    if chat_view.completion is None:
        error = errors.GenerationFailed("The generation ended unexpectedly.")
        return error.status, error.body()
    return 200, chat_view.completion.model_dump(mode="json")
