"""Serving a chat completion: submit the job, then turn its events into one response or SSE chunks.

The blocking and the streamed response are two views of the same event sequence, so a greedy
request returns the same text either way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from api import errors, limits, sse, tools
from api.following import Follow
from api.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    FinishReason,
    FunctionCall,
    ToolCallDelta,
    ToolCallOut,
    Usage,
)
from tasks import events, jobs, logs
from tasks.client import JobClient
from tasks.settings import Settings

log = logging.getLogger(__name__)

AnyEvent = events.AnyEvent


class ChatView:
    """The chat completion a job's events describe (blocking mode, and batch output lines)."""

    def __init__(self, job_id: str, created: int, model: str, *, tools: bool = False) -> None:
        self.job_id, self.created, self.model = job_id, created, model
        self._parts: list[str] = []
        self._tools = tools  # the job's text may be tool calls (api/tools.py)
        self.completion: ChatCompletion | None = None

    def apply(self, event: AnyEvent) -> None:
        """Fold one event in; a terminal event either completes the view or raises its error."""
        if isinstance(event, events.Delta):
            self._parts.append(event.text)
        elif isinstance(event, events.Finished) and event.finish_reason != "cancelled":
            text = "".join(self._parts)
            content, calls = tools.read_whole(self.job_id, text) if self._tools else (text, [])
            message = AssistantMessage(
                content=content,
                tool_calls=[
                    ToolCallOut(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
                    for c in calls
                ]
                or None,
            )
            self.completion = ChatCompletion(
                id=self.job_id,
                created=self.created,
                model=self.model,
                choices=[Choice(message=message, finish_reason=_finish_reason(event, called=bool(calls)))],
                usage=Usage.of(event.prompt_tokens, event.completion_tokens),
            )
        elif events.is_terminal(event):
            raise error_for(event)


def error_for(event: AnyEvent) -> errors.APIError:
    """The HTTP error a chat completion answers with when its job ended without an answer."""
    if isinstance(event, events.Failed):
        return errors.from_failure(event.code, event.message)
    if isinstance(event, events.Finished) and event.finish_reason == "cancelled":
        return errors.ServiceUnavailable("The request was cancelled before it finished.")
    return errors.GenerationFailed("The generation ended unexpectedly.")


def validate(request: ChatCompletionRequest, settings: Settings) -> None:
    """Everything checked before a job exists; the batch API checks its lines with this too."""
    if (param := request.unsupported_param()) is not None:
        raise errors.InvalidRequest(
            f"'{param}' is not supported by this server.", param=param, code="unsupported_parameter"
        )
    if request.model is not None and request.model != settings.model_name:
        raise errors.ModelNotFound(
            f"The model '{request.model}' does not exist; this server serves '{settings.model_name}'.",
            param="model",
        )
    request.grammar()  # a schema or tool it cannot follow is a 400 now
    for i, message in enumerate(request.messages):
        for j, call in enumerate(message.tool_calls or []):
            tools.check_arguments(
                call.function.arguments, f"messages[{i}].tool_calls[{j}].function.arguments"
            )
    limits.check_messages(settings, "messages", len(request.messages))
    limits.check_max_tokens(
        settings, max_tokens=request.max_tokens, max_completion_tokens=request.max_completion_tokens
    )


class ChatRun:
    """One chat completion travelling through the queue, from submit to its terminal event."""

    def __init__(
        self,
        request: ChatCompletionRequest,
        client: JobClient,
        settings: Settings,
        gone: asyncio.Event | None = None,
    ) -> None:
        self.request = request
        self.model = settings.model_name
        self.job_id = jobs.new_job_id("chatcmpl-")
        logs.job_id_var.set(self.job_id)
        self.created = int(time.time())
        self._follow = Follow(
            client, self.job_id, timeout_seconds=settings.request_timeout_seconds, gone=gone
        )
        self._ping_seconds = settings.stream_ping_seconds
        self._max_tokens_default = limits.default_max_tokens(settings)
        self._tools = request.tool_plan().calls_possible

    async def start(self) -> events.Started | None:
        """Subscribe, enqueue, and wait a while for a worker to accept the prompt.

        Waiting for the worker before answering lets prompt errors (context length) be real HTTP
        errors for streamed requests too, as OpenAI's are. A streamed request that is still queued
        after `stream_ping_seconds` gets its response head anyway (None here) and keep-alive
        pings, so proxies do not time out; errors then come in-band.
        """
        spec = self.request.to_job_spec(self.job_id, self.model, self._max_tokens_default)
        await self._follow.submit(spec)
        try:
            first = await self._follow.next(self._ping_seconds if self.request.stream else None)
        except BaseException:
            await asyncio.shield(self._follow.close())
            raise
        if first is None or isinstance(first, events.Started):
            return first
        await self._follow.close()
        raise error_for(first)

    async def complete(self) -> ChatCompletion:
        """Collect the whole answer (blocking mode)."""
        view = ChatView(self.job_id, self.created, self.model, tools=self._tools)
        try:
            while view.completion is None:
                event = await self._follow.next()
                if event is not None:
                    view.apply(event)
            return view.completion
        finally:
            await asyncio.shield(self._follow.close())

    async def stream(self) -> AsyncIterator[str]:
        """SSE lines: role chunk, content chunks, finish chunk, optional usage chunk, [DONE]."""
        reader = tools.ToolCallReader(self.job_id) if self._tools else None
        try:
            yield sse.data(self._chunk(Delta(role="assistant", content="")))
            while True:
                try:
                    event = await self._follow.next(self._ping_seconds)
                except errors.APIError as exc:
                    yield sse.data(errors.sse_error(exc))
                    break
                if event is None:
                    yield sse.comment("ping")
                elif isinstance(event, events.Delta):
                    for delta in _deltas(reader, event.text):
                        yield sse.data(self._chunk(delta))
                elif isinstance(event, events.Finished) and event.finish_reason != "cancelled":
                    called = reader is not None and reader.called
                    yield sse.data(self._chunk(Delta(), finish_reason=_finish_reason(event, called=called)))
                    if self.request.include_usage:
                        usage = Usage.of(event.prompt_tokens, event.completion_tokens)
                        yield sse.data(self._chunk(None, usage=usage))
                    break
                elif events.is_terminal(event):
                    yield sse.data(errors.sse_error(error_for(event)))
                    break
            yield sse.DONE
        finally:
            # Runs on normal end and when the client disconnects (the generator is cancelled).
            await asyncio.shield(self._follow.close())

    def _chunk(
        self, delta: Delta | None, finish_reason: str | None = None, usage: Usage | None = None
    ) -> str:
        choices = [] if delta is None else [ChunkChoice(delta=delta, finish_reason=finish_reason)]  # type: ignore[arg-type]
        chunk = ChatCompletionChunk(
            id=self.job_id, created=self.created, model=self.model, choices=choices, usage=usage
        )
        exclude = None if self.request.include_usage else {"usage"}
        return chunk.model_dump_json(exclude=exclude)


def _deltas(reader: tools.ToolCallReader | None, text: str) -> list[Delta]:
    """The chunks a piece of text makes: content, or tool calls (id and name, then arguments)."""
    if reader is None:
        return [Delta(content=text)]
    out = []
    for item in reader.feed(text):
        if isinstance(item, tools.Content):
            out.append(Delta(content=item.text))
        elif isinstance(item, tools.CallStarted):
            out.append(Delta(tool_calls=[ToolCallDelta(index=item.index, id=item.id, name=item.name)]))
        else:
            out.append(Delta(tool_calls=[ToolCallDelta(index=item.index, arguments=item.text)]))
    return out


def _finish_reason(event: events.Finished, *, called: bool = False) -> FinishReason:
    # OpenAI's chat API knows "stop", "length" and "tool_calls"; hitting the time limit is a
    # budget, like length. A generation that made calls and ended on its own ends in "tool_calls".
    if event.finish_reason == "time_limit":
        return "length"
    if event.finish_reason == "stop" and called:
        return "tool_calls"
    return "length" if event.finish_reason == "length" else "stop"
