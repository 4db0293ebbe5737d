"""Serving the Responses API: background jobs that are polled, resumed and cancelled by id.

A Response and its stream are a view of the job's event log, rebuilt by replaying it. The
rebuild is deterministic, so every stream event always gets the same sequence number, and a
client resuming with `starting_after=N` gets exactly the events after N: no gap, no duplicate,
whether the job is queued, running or finished.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from api import errors
from api.edge import sse
from api.edge.rate_limits import RateLimiter
from api.responses import conversations
from api.responses.protocol import (
    LOGPROBS_INCLUDE,
    DeletedResponse,
    FunctionCallItem,
    IncompleteDetails,
    OutputFunctionCall,
    OutputMessage,
    OutputText,
    Response,
    ResponseCreateRequest,
    ResponseError,
    ResponseItemList,
    ResponseStatus,
    ResponseUsage,
)
from api.serving import caps, tools
from api.serving.following import Follow
from api.serving.routing import route
from tasks import events, jobs, logs
from tasks.client import JobClient, JobNotFound
from tasks.registry import ModelRegistry
from tasks.settings import Settings

log = logging.getLogger(__name__)

# A response id as jobs.new_job_id("response") writes it: the prefix and 128 random bits in hex.
RESPONSE_ID = re.compile(re.escape(jobs.ID_PREFIXES["response"]) + "[0-9a-f]{32}")

# How long a cancel call waits for a running job to reach its terminal state before answering.
CANCEL_SETTLE_SECONDS = 3.0


class ResponseView:
    """The Response a job's events describe, and the stream events that describe it.

    Without tools the output is one message, opened when the job starts. With tools the text may
    be function calls (api/serving/tools.py): the message is then opened by its first text, and each call
    is a function_call item, its arguments streamed as function_call_arguments deltas.
    """

    def __init__(self, spec: jobs.JobSpec, meta: jobs.JobMeta, created_at: float) -> None:
        self.spec = spec
        self.created_at = created_at
        self.options = meta.response or jobs.ResponseOptions()
        self.status: ResponseStatus = "queued"
        self.text = ""
        self.logprobs: list[events.TokenLogprob] = []  # of the message's text, when asked for
        self.usage: ResponseUsage | None = None
        self.error: ResponseError | None = None
        self.incomplete: IncompleteDetails | None = None
        self.started = False
        self._message_open = False
        self._reader = tools.ToolCallReader(spec.id) if spec.tools else None
        self._seq = -1

    @property
    def item_id(self) -> str:
        return "msg_" + self.spec.id.removeprefix("resp_")

    def _item_status(self) -> str:
        return {"completed": "completed", "in_progress": "in_progress"}.get(self.status, "incomplete")

    def _calls(self) -> list[OutputFunctionCall]:
        status = self._item_status()
        return [
            OutputFunctionCall(
                id="fc_" + c.id.removeprefix("call_"),
                call_id=c.id,
                name=c.name,
                arguments=c.arguments,
                status=status,  # type: ignore[arg-type]
            )
            for c in (self._reader.calls if self._reader else [])
        ]

    def snapshot(self) -> Response:
        output: list[OutputMessage | OutputFunctionCall] = []
        if self._message_open:
            status = self._item_status()
            part = OutputText(text=self.text, logprobs=self.logprobs)
            output.append(OutputMessage(id=self.item_id, status=status, content=[part]))  # type: ignore[arg-type]
        output += self._calls()
        return Response(
            id=self.spec.id,
            created_at=int(self.created_at),
            status=self.status,
            background=self.options.background,
            error=self.error,
            incomplete_details=self.incomplete,
            instructions=self.options.instructions,
            max_output_tokens=self.options.max_output_tokens,
            metadata=self.options.metadata,
            model=self.spec.model,
            output=output,
            parallel_tool_calls=self.options.parallel_tool_calls,
            temperature=self.spec.sampling.temperature,
            top_p=self.spec.sampling.top_p,
            top_logprobs=self.spec.sampling.top_logprobs if self.spec.sampling.logprobs else None,
            tool_choice=self.options.tool_choice,
            tools=self.options.tools,
            truncation=self.options.truncation,
            store=self.options.store,
            previous_response_id=self.options.previous_response_id,
            usage=self.usage,
        )

    def opening(self) -> list[dict[str, Any]]:
        return [self._event("response.created", response=self._dump())]

    def apply(self, event: events.AnyEvent) -> list[dict[str, Any]]:
        """Fold one job event into the view; return the stream events it produces."""
        if isinstance(event, events.Started):
            self.status, self.started = "in_progress", True
            out = [self._event("response.in_progress", response=self._dump())]
            if self._reader is None:
                out += self._open_message()
            return out
        if isinstance(event, events.Delta):
            if self._reader is None:
                return self._text(event.text, event.logprobs)
            out = []
            # Text is either all message or all calls (api/serving/tools.py): in a message each delta is
            # one piece of content, its tokens' logprobs with it; calls carry none, as OpenAI's.
            for item in self._reader.feed(event.text):
                if isinstance(item, tools.Content):
                    out += self._open_message() if not self._message_open else []
                    out += self._text(item.text, event.logprobs)
                elif isinstance(item, tools.CallStarted):
                    # Added with no arguments yet: they follow as deltas (what the reader has
                    # already read of them is in the next events), as OpenAI streams a call.
                    call = self._calls()[item.index].model_copy(update={"arguments": ""}).model_dump()
                    out.append(self._event("response.output_item.added", output_index=item.index, item=call))
                else:
                    item_id = self._calls()[item.index].id
                    out.append(
                        self._event(
                            "response.function_call_arguments.delta",
                            item_id=item_id,
                            output_index=item.index,
                            delta=item.text,
                        )
                    )
            return out
        return self._finish(event)  # type: ignore[arg-type]

    def _open_message(self) -> list[dict[str, Any]]:
        self._message_open = True
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        item = {
            "type": "message",
            "id": self.item_id,
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        return [
            self._event("response.output_item.added", output_index=0, item=item),
            self._event(
                "response.content_part.added",
                item_id=self.item_id,
                output_index=0,
                content_index=0,
                part=part,
            ),
        ]

    def _text(self, text: str, logprobs: list[events.TokenLogprob] | None) -> list[dict[str, Any]]:
        self.text += text
        self.logprobs += logprobs or []
        ids = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        entries = [x.model_dump() for x in logprobs or []]
        return [self._event("response.output_text.delta", **ids, delta=text, logprobs=entries)]

    def _finish(self, event: events.Finished | events.Failed) -> list[dict[str, Any]]:
        if isinstance(event, events.Failed):
            self.status = "failed"
            self.error = ResponseError(code=event.code, message=event.message)
        else:
            self.usage = ResponseUsage(
                input_tokens=event.prompt_tokens,
                output_tokens=event.completion_tokens,
                total_tokens=event.prompt_tokens + event.completion_tokens,
            )
            self.status = jobs.status_for(event)
            if event.finish_reason == "length":
                self.incomplete = IncompleteDetails(reason="max_output_tokens")
            elif event.finish_reason == "time_limit":
                self.incomplete = IncompleteDetails(reason="time_limit")
        out: list[dict[str, Any]] = []
        snapshot = self.snapshot()
        if self._message_open:
            message = snapshot.output[0].model_dump()
            part = message["content"][0]
            ids = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
            out += [
                self._event("response.output_text.done", **ids, text=self.text, logprobs=part["logprobs"]),
                self._event("response.content_part.done", **ids, part=part),
                self._event("response.output_item.done", output_index=0, item=message),
            ]
        for index, call in enumerate(self._calls()):
            out += [
                self._event(
                    "response.function_call_arguments.done",
                    item_id=call.id,
                    output_index=index,
                    arguments=call.arguments,
                ),
                self._event("response.output_item.done", output_index=index, item=call.model_dump()),
            ]
        # The Responses stream has no cancelled event; a cancelled response ends as failed,
        # with the response's own status saying "cancelled".
        kind = {"completed": "response.completed", "incomplete": "response.incomplete"}.get(
            self.status, "response.failed"
        )
        out.append(self._event(kind, response=self._dump()))
        return out

    def _dump(self) -> dict[str, Any]:
        return self.snapshot().model_dump(mode="json")

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self._seq += 1
        return {"type": kind, "sequence_number": self._seq, **fields}


def _sse(event: dict[str, Any]) -> str:
    return f"event: {event['type']}\n" + sse.data(json.dumps(event, ensure_ascii=False))


def not_found(response_id: str, param: str) -> errors.NotFound:
    return errors.NotFound(f"No response with id '{response_id[:80]}'.", param=param)


async def _owned(client: JobClient, response_id: str, owner: str | None, param: str) -> jobs.JobRecord:
    """The record of the caller's response with this id; NotFound (naming `param`) otherwise."""
    # Only ids this service hands out reach Redis: a key built from "resp_X:log" would be
    # another key of job X (and the wrong type), so anything else is unknown without a look.
    if not RESPONSE_ID.fullmatch(response_id):
        raise not_found(response_id, param)
    try:
        record = await client.record(response_id)
    except JobNotFound:
        raise not_found(response_id, param) from None
    # A chat completion's job is not a Response; another key's job is not there for this
    # caller: the same 404 as an unknown id, so its existence is not revealed either.
    # A batch line is its batch's: it is read, and cancelled, through /v1/batches only.
    if record.spec.kind != "response" or record.meta.owner != owner or record.spec.batch:
        raise not_found(response_id, param)
    return record


def _stored(record: jobs.JobRecord, param: str) -> jobs.ResponseOptions:
    """A stored response's options; NotFound (naming `param`) for one created with store: false."""
    options = record.meta.response or jobs.ResponseOptions()
    if not options.store:
        raise errors.NotFound(f"The response '{record.spec.id}' was not stored (store: false).", param=param)
    return options


async def conversation(client: JobClient, response_id: str, owner: str | None) -> list[jobs.Message]:
    """The conversation a new response continues (previous_response_id): what the stored
    response `response_id` was given, its instructions left out, and what it answered."""
    param = "previous_response_id"
    record = await _owned(client, response_id, owner, param)
    options = _stored(record, param)
    if record.status in ("queued", "in_progress"):
        # As OpenAI: a response still being generated has no output to continue from yet.
        raise errors.InvalidRequest(
            f"The response '{response_id}' is still {record.status}; continue it once it has ended.",
            param=param,
        )
    view = ResponseView(record.spec, record.meta, record.created_at)
    for event in await client.log(response_id):
        view.apply(event)
    return conversations.given(record.spec, options) + conversations.answered(view.snapshot().output)


def history_room(request: ResponseCreateRequest, settings: Settings) -> int:
    """How many turns a continued conversation may hold before this request's input: MAX_MESSAGES,
    less the instructions' turn."""
    return settings.max_messages - (1 if request.instructions else 0)


def validate(request: ResponseCreateRequest, settings: Settings) -> None:
    """Everything checked before a job exists; the batch API checks its lines with this too."""
    if (param := request.unsupported_param()) is not None:
        raise errors.InvalidRequest(
            f"'{param}' is not supported by this server.", param=param, code="unsupported_parameter"
        )
    if request.top_logprobs and not request.logprobs:
        raise errors.InvalidRequest(
            f"top_logprobs needs include: ['{LOGPROBS_INCLUDE}'].", param="top_logprobs"
        )
    request.grammar()  # a schema or tool it cannot follow is a 400 now
    if isinstance(request.input, list):
        caps.check_messages(settings, "input", len(request.input))
        for i, item in enumerate(request.input):
            if isinstance(item, FunctionCallItem):
                tools.check_call(item.name, item.arguments, f"input[{i}]")
    caps.check_max_tokens(settings, max_output_tokens=request.max_output_tokens)


class ResponsesService:
    def __init__(
        self,
        client: JobClient,
        models: ModelRegistry,
        settings: Settings,
        owner: str | None = None,
        limits: RateLimiter | None = None,
    ) -> None:
        self._client = client
        self._models = models
        self._settings = settings
        self._owner = owner  # the caller's owner tag (api.auth); jobs of other owners are 404
        self._limits = limits  # the caller's rate limits, taken from by every create

    async def validate(self, request: ResponseCreateRequest) -> str:
        """Check the request; the served model it goes to."""
        validate(request, self._settings)
        return await route(self._models, request.model)

    async def _new_job(self, request: ResponseCreateRequest, model: str) -> jobs.NewJob:
        history = None
        if request.previous_response_id is not None:
            earlier = await conversation(self._client, request.previous_response_id, self._owner)
            room = history_room(request, self._settings)
            history = conversations.fit_history(
                earlier, request.input_messages(), room, request.truncation or "disabled"
            )
        job = request.to_job(
            jobs.new_job_id("response"),
            model,
            max_tokens_default=caps.default_max_tokens(self._settings),
            owner=self._owner,
            history=history,
        )
        logs.job_id_var.set(job.spec.id)
        if self._limits is not None:
            await self._limits.take(job)
        return job

    async def create_background(self, request: ResponseCreateRequest, model: str) -> Response:
        """Enqueue and answer at once, with the response as queued."""
        job = await self._new_job(request, model)
        with errors.queue_errors():
            created_at = await self._client.create(job)
        return ResponseView(job.spec, job.meta, created_at).snapshot()

    async def create_stream(self, request: ResponseCreateRequest, model: str) -> AsyncIterator[str]:
        """The events as they come. A background job outlives its stream: a client that leaves
        resumes it later; any other is cancelled with its stream."""
        job = await self._new_job(request, model)
        follow = self._follow(job.spec.id, cancel_on_close=not request.background)
        view = ResponseView(job.spec, job.meta, await follow.submit(job))
        first = await self._first(follow, self._settings.stream_ping_seconds)
        return self._stream(view, follow, after=-1, first=first)

    async def create_blocking(
        self, request: ResponseCreateRequest, model: str, gone: asyncio.Event
    ) -> Response:
        """The finished Response; `gone` (api.serving.following.ClientWatch) cancels the job if
        the client leaves first."""
        job = await self._new_job(request, model)
        follow = self._follow(job.spec.id, gone=gone)
        view = ResponseView(job.spec, job.meta, await follow.submit(job))
        return await self._collect(view, follow, await self._first(follow, None))

    async def _first(self, follow: Follow, wait: float | None) -> events.AnyEvent | None:
        """The job's first event, waited for up to `wait` seconds (None: until it comes). A job
        that failed for the request's fault before it started (a conversation too long for the
        model's context) is then the HTTP error, as a chat completion's is, not a failed
        Response; a stream still queued after `wait` starts anyway, and such an error then
        ends it as a failed Response."""
        return await follow.first(wait, _request_failure)

    async def retrieve(self, job_id: str) -> Response:
        view = await self._view(job_id)
        for event in await self._client.log(job_id):
            view.apply(event)
        return view.snapshot()

    async def resume(self, job_id: str, starting_after: int) -> AsyncIterator[str]:
        view = await self._view(job_id)
        follow = self._follow(job_id)
        with errors.queue_errors():
            await follow.attach()
        return self._stream(view, follow, after=starting_after)

    async def cancel(self, job_id: str) -> Response:
        await self._view(job_id)
        await self._client.cancel(job_id)
        deadline = time.monotonic() + CANCEL_SETTLE_SECONDS
        while True:  # bounded: a running job stops between tokens, well within the deadline
            response = await self.retrieve(job_id)
            if response.status not in ("queued", "in_progress") or time.monotonic() > deadline:
                return response
            await asyncio.sleep(0.05)

    async def input_items(
        self,
        job_id: str,
        *,
        limit: int,
        order: Literal["asc", "desc"],
        after: str | None = None,
        before: str | None = None,
    ) -> ResponseItemList:
        """The items a stored response was given (the conversation it continued included)."""
        record = await self._record(job_id)
        options = _stored(record, "response_id")
        listed = conversations.items(job_id, conversations.given(record.spec, options))
        return conversations.page(listed, limit=limit, order=order, after=after, before=before)

    async def delete(self, job_id: str) -> DeletedResponse:
        """Delete an ended response's record and log. One still queued or running is refused
        (400): cancel it first, so that it ends, and is counted and announced, once."""
        await self._record(job_id)
        status = await self._client.delete(job_id)
        if status is None:  # it expired meanwhile
            raise not_found(job_id, "response_id")
        if status != "deleted":
            raise errors.InvalidRequest(
                f"The response '{job_id}' is still {status}; cancel it before deleting it.",
                param="response_id",
            )
        log.info("response deleted")
        return DeletedResponse(id=job_id)

    async def _record(self, job_id: str) -> jobs.JobRecord:
        record = await _owned(self._client, job_id, self._owner, "response_id")
        logs.job_id_var.set(job_id)  # this request's logs and x-request-id name the job
        return record

    async def _view(self, job_id: str) -> ResponseView:
        """The caller's response with this id, before any of its events; NotFound otherwise."""
        record = await self._record(job_id)
        return ResponseView(record.spec, record.meta, record.created_at)

    def _follow(self, job_id: str, gone: asyncio.Event | None = None, cancel_on_close: bool = True) -> Follow:
        timeout = self._settings.request_timeout_seconds
        return Follow(
            self._client, job_id, timeout_seconds=timeout, gone=gone, cancel_on_close=cancel_on_close
        )

    async def _collect(self, view: ResponseView, follow: Follow, first: events.AnyEvent | None) -> Response:
        try:
            if first is not None:
                view.apply(first)
            while not follow.ended:
                event = await follow.next()
                if event is not None:
                    view.apply(event)
            return view.snapshot()
        finally:
            await asyncio.shield(follow.close())

    async def _stream(
        self, view: ResponseView, follow: Follow, after: int, first: events.AnyEvent | None = None
    ) -> AsyncIterator[str]:
        try:
            opening = view.opening() + (view.apply(first) if first is not None else [])
            for out in opening:
                if out["sequence_number"] > after:
                    yield _sse(out)
            while not follow.ended:
                try:
                    event = await follow.next(self._settings.stream_ping_seconds)
                except errors.APIError as exc:  # the deadline, or Redis lost
                    yield sse.data(errors.sse_error(exc))
                    break
                if event is None:
                    yield sse.comment("ping")
                    continue
                for out in view.apply(event):
                    if out["sequence_number"] > after:
                        yield _sse(out)
        finally:
            # Runs on normal end and when the client disconnects (the generator is cancelled).
            await asyncio.shield(follow.close())


def _request_failure(event: events.AnyEvent) -> errors.APIError | None:
    """The HTTP error a Response's first event means, if any: a job failed for the request's
    fault (or lost) before it started. Other endings are failed Responses, not HTTP errors."""
    if isinstance(event, events.Failed) and errors.is_request_failure(event.code):
        return errors.from_failure(event.code, event.message)
    return None
