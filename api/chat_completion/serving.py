"""Serving a chat completion: submit the job, then turn its events into one response or SSE chunks.

The blocking and the streamed response are two views of the same event sequence, so a greedy
request returns the same text either way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from api import errors
from api.chat_completion.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    FinishReason,
    FunctionCall,
    ToolCallDelta,
    ToolCallOut,
    Usage,
)
from api.edge import sse
from api.serving import caps, tools
from api.serving.following import Follow
from tasks import events, jobs, logs
from tasks.client import JobClient
from tasks.settings import Settings

log = logging.getLogger(__name__)

AnyEvent = events.AnyEvent


class ChatView:
    """The chat completion a job's events describe (blocking mode, and batch output lines)."""

    def __init__(
        self,
        job_id: str,
        created: int,
        model: str,
        *,
        tools: bool = False,
        n: int = 1,
        logprobs: bool = False,
    ) -> None:
        self.job_id, self.created, self.model = job_id, created, model
        self._parts: list[list[str]] = [[] for _ in range(n)]  # by choice
        # With logprobs asked, a choice that generated no text still has its (empty) list.
        self._logprobs: list[list[events.TokenLogprob]] | None = [[] for _ in range(n)] if logprobs else None
        self._tools = tools  # the job's text may be tool calls (api/serving/tools.py)
        self.completion: ChatCompletion | None = None

    def apply(self, event: AnyEvent) -> None:
        """Fold one event in; a terminal event either completes the view or raises its error."""
        if isinstance(event, events.Delta):
            self._parts[event.index].append(event.text)
            if event.logprobs is not None and self._logprobs is not None:
                self._logprobs[event.index].extend(event.logprobs)
        elif isinstance(event, events.Finished) and event.finish_reason != "cancelled":
            self.completion = ChatCompletion(
                id=self.job_id,
                created=self.created,
                model=self.model,
                choices=[self._choice(i, event) for i in range(len(self._parts))],
                usage=Usage.of(event.prompt_tokens, event.completion_tokens),
            )
        elif events.is_terminal(event):
            raise error_for(event)

    def _choice(self, index: int, event: events.Finished) -> Choice:
        text = "".join(self._parts[index])
        # Each choice's calls get ids of their own: the choice index is part of what they hash.
        content, calls = (
            tools.read_whole(_choice_key(self.job_id, index), text) if self._tools else (text, [])
        )
        message = AssistantMessage(
            content=content,
            tool_calls=[
                ToolCallOut(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls
            ]
            or None,
        )
        entries = None if self._logprobs is None else self._logprobs[index]
        return Choice(
            index=index,
            message=message,
            finish_reason=_finish_reason(event.reason_of(index), called=bool(calls)),
            logprobs=None if entries is None else ChoiceLogprobs(content=entries),
        )


def _choice_key(job_id: str, index: int) -> str:
    return job_id if index == 0 else f"{job_id}:{index}"


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
    if request.top_logprobs and not request.logprobs:
        raise errors.InvalidRequest("top_logprobs needs logprobs set to true.", param="top_logprobs")
    if request.n > settings.max_n:
        raise errors.InvalidRequest(f"n must be at most {settings.max_n}; got {request.n}.", param="n")
    request.grammar()  # a schema or tool it cannot follow is a 400 now
    for i, message in enumerate(request.messages):
        for j, call in enumerate(message.tool_calls or []):
            tools.check_call(
                call.function.name, call.function.arguments, f"messages[{i}].tool_calls[{j}].function"
            )
    if request.stop and request.tool_plan.calls_possible:
        raise errors.InvalidRequest(
            "'stop' cannot be combined with tools a call could use: a stop string would cut a call.",
            param="stop",
            code="unsupported_parameter",
        )
    caps.check_messages(settings, "messages", len(request.messages))
    caps.check_max_tokens(
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
        self.job_id = jobs.new_job_id("chat")
        logs.job_id_var.set(self.job_id)
        self.created = 0  # set when the job is admitted, from its record's created_at
        self._follow = Follow(
            client, self.job_id, timeout_seconds=settings.request_timeout_seconds, gone=gone
        )
        self._ping_seconds = settings.stream_ping_seconds
        self._max_tokens_default = caps.default_max_tokens(settings)
        self._tools = request.tool_plan.calls_possible

    async def start(self) -> events.Started | None:
        """Subscribe, enqueue, and wait a while for a worker to accept the prompt.

        Waiting for the worker before answering lets prompt errors (context length) be real HTTP
        errors for streamed requests too, as OpenAI's are. A streamed request that is still queued
        after `stream_ping_seconds` gets its response head anyway (None here) and keep-alive
        pings, so proxies do not time out; errors then come in-band.
        """
        job = self.request.to_job(self.job_id, self.model, self._max_tokens_default)
        self.created = int(await self._follow.submit(job))
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
        view = ChatView(
            self.job_id,
            self.created,
            self.model,
            tools=self._tools,
            n=self.request.n,
            logprobs=bool(self.request.logprobs),
        )
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
        n = self.request.n
        readers = [
            tools.ToolCallReader(_choice_key(self.job_id, i)) if self._tools else None for i in range(n)
        ]
        try:
            for index in range(n):
                yield sse.data(self._chunk(Delta(role="assistant", content=""), index))
            while True:
                try:
                    event = await self._follow.next(self._ping_seconds)
                except errors.APIError as exc:
                    yield sse.data(errors.sse_error(exc))
                    break
                if event is None:
                    yield sse.comment("ping")
                elif isinstance(event, events.Delta):
                    deltas = _deltas(readers[event.index], event.text)
                    if event.logprobs is not None:  # the token entries ride with the delta's first chunk
                        logprobs = ChoiceLogprobs(content=event.logprobs)
                        yield sse.data(
                            self._chunk(deltas[0] if deltas else Delta(), event.index, logprobs=logprobs)
                        )
                        deltas = deltas[1:]
                    for delta in deltas:
                        yield sse.data(self._chunk(delta, event.index))
                elif isinstance(event, events.Finished) and event.finish_reason != "cancelled":
                    for index, reader in enumerate(readers):
                        called = reader is not None and reader.called
                        reason = _finish_reason(event.reason_of(index), called=called)
                        yield sse.data(self._chunk(Delta(), index, finish_reason=reason))
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
        self,
        delta: Delta | None,
        index: int = 0,
        *,
        finish_reason: FinishReason | None = None,
        usage: Usage | None = None,
        logprobs: ChoiceLogprobs | None = None,
    ) -> str:
        choices = (
            []
            if delta is None
            else [ChunkChoice(index=index, delta=delta, finish_reason=finish_reason, logprobs=logprobs)]
        )
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


def _finish_reason(reason: events.FinishReason, *, called: bool = False) -> FinishReason:
    # OpenAI's chat API knows "stop", "length" and "tool_calls"; hitting the time limit is a
    # budget, like length. A generation that made calls and ended on its own ends in "tool_calls".
    if reason in ("time_limit", "length"):
        return "length"
    return "tool_calls" if called else "stop"
