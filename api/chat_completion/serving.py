"""Serving a chat completion: submit the job, then turn its events into one response or SSE chunks.

The blocking and the streamed response are two renderings of one fold of the job's events
(`ChatView`), so a request answers with the same text, calls, logprobs, finish reasons and usage
either way (tests/unit/test_chat_view.py).
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


class _ChoiceState:
    """What one choice's events have said so far: its text (or calls) and its token entries."""

    def __init__(self, reader: tools.ToolCallReader | None, logprobs: bool) -> None:
        self.reader = reader  # with tools, the text may be calls (api/serving/tools.py)
        self.content: list[str] = []
        # With logprobs asked, a choice that generated no text still has its (empty) list.
        self.logprobs: list[events.TokenLogprob] | None = [] if logprobs else None

    @property
    def calls(self) -> list[jobs.ToolCall]:
        return self.reader.calls if self.reader is not None else []


class ChatView:
    """The chat completion a job's events describe, as one answer and as the chunks that stream it.

    One fold: `apply` takes each event into the choices' state and returns the chunks that say
    what it added; at the end `completion` is rendered from the same state. So the blocking answer
    (and a batch's output line) equals what a client assembles from the stream.
    """

    def __init__(
        self,
        job_id: str,
        created: int,
        model: str,
        *,
        with_tools: bool = False,
        n: int = 1,
        logprobs: bool = False,
    ) -> None:
        self.job_id, self.created, self.model = job_id, created, model
        self._choices = [
            _ChoiceState(tools.ToolCallReader(_choice_key(job_id, i)) if with_tools else None, logprobs)
            for i in range(n)
        ]
        self.completion: ChatCompletion | None = None

    @classmethod
    def of(cls, spec: jobs.JobSpec, created: int) -> ChatView:
        return cls(
            spec.id,
            created,
            spec.model,
            with_tools=bool(spec.tools),  # the prompt offers tools exactly when a call is possible
            n=spec.sampling.n,
            logprobs=spec.sampling.logprobs,
        )

    def opening(self) -> list[ChatCompletionChunk]:
        """Each choice's first chunk: its role, and empty content."""
        return [self._chunk(i, Delta(role="assistant", content="")) for i in range(len(self._choices))]

    def apply(self, event: AnyEvent) -> list[ChatCompletionChunk]:
        """Fold one event in and return its chunks; a terminal event either completes the view
        (its chunks are the finish reasons) or raises its error."""
        if isinstance(event, events.Delta):
            return self._delta(event)
        if isinstance(event, events.Finished) and event.finish_reason != "cancelled":
            return self._finish(event)
        if events.is_terminal(event):
            raise error_for(event)
        return []

    def _delta(self, event: events.Delta) -> list[ChatCompletionChunk]:
        choice = self._choices[event.index]
        pieces = choice.reader.feed(event.text) if choice.reader is not None else [tools.Content(event.text)]
        deltas = []
        for piece in pieces:
            if isinstance(piece, tools.Content):
                choice.content.append(piece.text)
                deltas.append(Delta(content=piece.text))
            elif isinstance(piece, tools.CallStarted):
                call = ToolCallDelta(index=piece.index, id=piece.id, name=piece.name)
                deltas.append(Delta(tool_calls=[call]))
            else:
                deltas.append(Delta(tool_calls=[ToolCallDelta(index=piece.index, arguments=piece.text)]))
        chunks = [self._chunk(event.index, delta) for delta in deltas]
        if choice.logprobs is not None and event.logprobs is not None:
            choice.logprobs += event.logprobs
            # The token entries ride with the delta's first chunk, or an empty one of their own.
            entries = ChoiceLogprobs(content=event.logprobs)
            first = chunks[0] if chunks else self._chunk(event.index, Delta())
            first.choices[0].logprobs = entries
            chunks[:1] = [first]
        return chunks

    def _finish(self, event: events.Finished) -> list[ChatCompletionChunk]:
        choices = [self._choice(i, event) for i in range(len(self._choices))]
        self.completion = ChatCompletion(
            id=self.job_id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=Usage.of(event.prompt_tokens, event.completion_tokens),
        )
        return [self._chunk(c.index, Delta(), finish_reason=c.finish_reason) for c in choices]

    def _choice(self, index: int, event: events.Finished) -> Choice:
        state = self._choices[index]
        calls = [
            ToolCallOut(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
            for c in state.calls
        ]
        # A choice that made calls has no content, as OpenAI's.
        message = AssistantMessage(
            content=None if calls else "".join(state.content), tool_calls=calls or None
        )
        return Choice(
            index=index,
            message=message,
            finish_reason=_finish_reason(event.reason_of(index), called=bool(calls)),
            logprobs=None if state.logprobs is None else ChoiceLogprobs(content=state.logprobs),
        )

    def _chunk(
        self, index: int, delta: Delta, *, finish_reason: FinishReason | None = None
    ) -> ChatCompletionChunk:
        choice = ChunkChoice(index=index, delta=delta, finish_reason=finish_reason)
        return ChatCompletionChunk(id=self.job_id, created=self.created, model=self.model, choices=[choice])


class ChatStream:
    """The SSE rendering of a ChatView: the lines each event adds, up to and including [DONE].

    After the role chunks, each event's chunks; at the end, with stream_options.include_usage,
    a chunk with no choices and the answer's usage. An error after the stream has started goes
    in-band, `data: {"error": ...}`, and then [DONE].
    """

    def __init__(self, view: ChatView, *, include_usage: bool = False) -> None:
        self.view = view
        self._include_usage = include_usage
        self.ended = False

    def opening(self) -> list[str]:
        return [self._data(chunk) for chunk in self.view.opening()]

    def lines(self, event: AnyEvent) -> list[str]:
        try:
            chunks = self.view.apply(event)
        except errors.APIError as exc:
            return self.failed(exc)
        out = [self._data(chunk) for chunk in chunks]
        if (completion := self.view.completion) is not None:
            if self._include_usage:
                view = self.view
                usage = ChatCompletionChunk(
                    id=view.job_id, created=view.created, model=view.model, choices=[], usage=completion.usage
                )
                out.append(self._data(usage))
            out.append(sse.DONE)
            self.ended = True
        return out

    def failed(self, error: errors.APIError) -> list[str]:
        self.ended = True
        return [sse.data(errors.sse_error(error)), sse.DONE]

    def _data(self, chunk: ChatCompletionChunk) -> str:
        # With include_usage every chunk has "usage" (null until the last), as OpenAI's.
        exclude = None if self._include_usage else {"usage"}
        return sse.data(chunk.model_dump_json(exclude=exclude))


def _choice_key(job_id: str, index: int) -> str:
    return job_id if index == 0 else f"{job_id}:{index}"


def _unless_started(event: AnyEvent) -> errors.APIError | None:
    """A chat completion's first event is its start, or the error it answers with."""
    return None if isinstance(event, events.Started) else error_for(event)


def error_for(event: AnyEvent) -> errors.APIError:
    """The HTTP error a chat completion answers with when its job ended without an answer."""
    if isinstance(event, events.Failed):
        return errors.from_failure(event.code, event.message)
    if isinstance(event, events.Finished) and event.finish_reason == "cancelled":
        return errors.ServiceUnavailable("The request was cancelled before it finished.")
    return errors.GenerationFailed("The generation ended unexpectedly.")


def validate(request: ChatCompletionRequest, settings: Settings) -> None:
    """Everything checked before a job exists but its model (api/serving/routing.py); the batch
    API checks its lines with this too."""
    if (param := request.unsupported_param()) is not None:
        raise errors.InvalidRequest(
            f"'{param}' is not supported by this server.", param=param, code="unsupported_parameter"
        )
    if request.top_logprobs and not request.logprobs:
        raise errors.InvalidRequest("top_logprobs needs logprobs set to true.", param="top_logprobs")
    if request.n is not None and request.n > settings.max_n:
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
        model: str,
        client: JobClient,
        settings: Settings,
        gone: asyncio.Event | None = None,
        owner: str | None = None,
    ) -> None:
        self.request = request
        self.job_id = jobs.new_job_id("chat")
        logs.job_id_var.set(self.job_id)
        # The caller's owner tag: the job counts against its key's share (tasks/jobs.py).
        self.job = request.to_job(self.job_id, model, caps.default_max_tokens(settings), owner=owner)
        self.created = 0  # set when the job is admitted, from its record's created_at
        self._follow = Follow(
            client, self.job_id, timeout_seconds=settings.request_timeout_seconds, gone=gone
        )
        self._ping_seconds = settings.stream_ping_seconds

    async def start(self) -> events.Started | None:
        """Subscribe, enqueue, and wait a while for a worker to accept the prompt.

        Waiting for the worker before answering lets prompt errors (context length) be real HTTP
        errors for streamed requests too, as OpenAI's are. A streamed request that is still queued
        after `stream_ping_seconds` gets its response head anyway (None here) and keep-alive
        pings, so proxies do not time out; errors then come in-band.
        """
        self.created = int(await self._follow.submit(self.job))
        wait = self._ping_seconds if self.request.stream else None
        first = await self._follow.first(wait, _unless_started)
        return first if isinstance(first, events.Started) else None  # any other event was refused

    async def complete(self) -> ChatCompletion:
        """Collect the whole answer (blocking mode)."""
        view = ChatView.of(self.job.spec, self.created)
        try:
            while view.completion is None:
                event = await self._follow.next()
                if event is not None:
                    view.apply(event)
            return view.completion
        finally:
            await asyncio.shield(self._follow.close())

    async def stream(self) -> AsyncIterator[str]:
        """SSE lines: role chunks, the events' chunks, finish chunks, optional usage chunk, [DONE]."""
        out = ChatStream(ChatView.of(self.job.spec, self.created), include_usage=self.request.include_usage)
        try:
            for line in out.opening():
                yield line
            while not out.ended:
                try:
                    event = await self._follow.next(self._ping_seconds)
                except errors.APIError as exc:
                    lines = out.failed(exc)
                else:
                    lines = [sse.comment("ping")] if event is None else out.lines(event)
                for line in lines:
                    yield line
        finally:
            # Runs on normal end and when the client disconnects (the generator is cancelled).
            await asyncio.shield(self._follow.close())


def _finish_reason(reason: events.FinishReason, *, called: bool = False) -> FinishReason:
    # OpenAI's chat API knows "stop", "length" and "tool_calls"; hitting the time limit is a
    # budget, like length. A generation that made calls and ended on its own ends in "tool_calls".
    if reason in ("time_limit", "length"):
        return "length"
    return "tool_calls" if called else "stop"
