"""Serving a chat completion: submit the job, then turn its events into one response or SSE chunks.

The blocking and the streamed response are two views of the same event sequence, so a greedy
request returns the same text either way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import redis.exceptions

from api import errors, limits, sse
from api.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    Usage,
)
from tasks import events, jobs, logs
from tasks.client import EventFollower, JobClient
from tasks.settings import Settings

log = logging.getLogger(__name__)

AnyEvent = events.AnyEvent

# How often a waiting request checks that its client is still there.
DISCONNECT_POLL_SECONDS = 0.5


class ChatRun:
    """One chat completion travelling through the queue, from submit to its terminal event."""

    def __init__(
        self,
        request: ChatCompletionRequest,
        client: JobClient,
        settings: Settings,
        is_disconnected: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self.request = request
        self._is_disconnected = is_disconnected
        self.model = settings.model_name
        self.job_id = jobs.new_job_id("chatcmpl-")
        logs.job_id_var.set(self.job_id)
        self.created = int(time.time())
        self._client = client
        self._deadline = time.monotonic() + settings.request_timeout_seconds
        self._follower: EventFollower | None = None
        self._ping_seconds = settings.stream_ping_seconds
        self._max_tokens_default = limits.default_max_tokens(settings)
        self._ended = False
        self._started = False

    @classmethod
    def validate(cls, request: ChatCompletionRequest, settings: Settings) -> None:
        if (param := request.unsupported_param()) is not None:
            raise errors.InvalidRequest(
                f"'{param}' is not supported by this server.", param=param, code="unsupported_parameter"
            )
        if request.model is not None and request.model != settings.model_name:
            raise errors.ModelNotFound(
                f"The model '{request.model}' does not exist; this server serves '{settings.model_name}'.",
                param="model",
            )
        limits.check_messages(settings, "messages", len(request.messages))
        limits.check_max_tokens(
            settings, max_tokens=request.max_tokens, max_completion_tokens=request.max_completion_tokens
        )

    async def start(self) -> events.Started | None:
        """Subscribe, enqueue, and wait a while for a worker to accept the prompt.

        Waiting for the worker before answering lets prompt errors (context length) be real HTTP
        errors for streamed requests too, as OpenAI's are. A streamed request that is still queued
        after `stream_ping_seconds` gets its response head anyway (None here) and keep-alive
        pings, so proxies do not time out; errors then come in-band.
        """
        spec = self.request.to_job_spec(self.job_id, self.model, self._max_tokens_default)
        try:
            with errors.queue_errors():
                self._follower = self._client.subscribe(self.job_id)
                await self._follower.__aenter__()
                await self._client.create(spec)
        except BaseException:
            # Whatever failed (even a bug), the subscription must not outlive the request.
            await asyncio.shield(self.close())
            raise
        self._started = True
        try:
            first = await self.next_event(self._ping_seconds if self.request.stream else None)
        except BaseException:
            await asyncio.shield(self.close())
            raise
        if first is None or isinstance(first, events.Started):
            return first
        await self.close()
        raise self._error_for(first)

    async def next_event(self, wait: float | None = None) -> AnyEvent | None:
        """The next event; None if `wait` seconds pass first (the read stays pending).

        Waits in short slices so that a client that went away is noticed while its job is still
        queued or running; its job is then cancelled (close) instead of running for nobody.
        """
        assert self._follower is not None
        give_up = self._deadline if wait is None else min(self._deadline, time.monotonic() + wait)
        while True:
            slice_seconds = min(max(give_up - time.monotonic(), 0.0), DISCONNECT_POLL_SECONDS)
            try:
                event = await self._follower.next(slice_seconds)
            except redis.exceptions.RedisError as exc:
                raise errors.ServiceUnavailable("Lost the connection to the queue.") from exc
            if event is not None:
                if events.is_terminal(event):
                    self._ended = True
                return event
            if self._is_disconnected is not None and await self._is_disconnected():
                raise errors.ClientDisconnected("The client closed the request.")
            if time.monotonic() >= give_up:
                if give_up < self._deadline:
                    return None
                raise errors.Timeout("The generation did not finish within the request timeout.")

    async def close(self) -> None:
        """Release the subscription; a job that has not ended is cancelled (its client is gone)."""
        try:
            if not self._ended and self._started:
                await self._client.cancel(self.job_id)
        except redis.exceptions.RedisError:
            log.warning("could not cancel abandoned job %s", self.job_id)
        finally:
            self._ended = True
            if self._follower is not None:
                follower, self._follower = self._follower, None
                await follower.__aexit__(None, None, None)

    def _error_for(self, event: AnyEvent) -> errors.APIError:
        if isinstance(event, events.Failed):
            return errors.from_failure(event.code, event.message)
        if isinstance(event, events.Finished) and event.finish_reason == "cancelled":
            return errors.ServiceUnavailable("The request was cancelled before it finished.")
        return errors.GenerationFailed("The generation ended unexpectedly.")

    async def complete(self) -> ChatCompletion:
        """Collect the whole answer (blocking mode)."""
        parts: list[str] = []
        try:
            while True:
                event = await self.next_event()
                if isinstance(event, events.Delta):
                    parts.append(event.text)
                elif isinstance(event, events.Finished) and event.finish_reason != "cancelled":
                    return ChatCompletion(
                        id=self.job_id,
                        created=self.created,
                        model=self.model,
                        choices=[
                            Choice(
                                message=AssistantMessage(content="".join(parts)),
                                finish_reason=_finish_reason(event),
                            )
                        ],
                        usage=Usage.of(event.prompt_tokens, event.completion_tokens),
                    )
                elif event is not None and events.is_terminal(event):
                    raise self._error_for(event)
        finally:
            await self.close()

    async def stream(self) -> AsyncIterator[str]:
        """SSE lines: role chunk, content chunks, finish chunk, optional usage chunk, [DONE]."""
        try:
            yield sse.data(self._chunk(Delta(role="assistant", content="")))
            while True:
                try:
                    event = await self.next_event(self._ping_seconds)
                except errors.APIError as exc:
                    yield sse.data(errors.sse_error(exc))
                    break
                if event is None:
                    yield sse.comment("ping")
                elif isinstance(event, events.Delta):
                    yield sse.data(self._chunk(Delta(content=event.text)))
                elif isinstance(event, events.Finished) and event.finish_reason != "cancelled":
                    yield sse.data(self._chunk(Delta(), finish_reason=_finish_reason(event)))
                    if self.request.include_usage:
                        usage = Usage.of(event.prompt_tokens, event.completion_tokens)
                        yield sse.data(self._chunk(None, usage=usage))
                    break
                elif events.is_terminal(event):
                    yield sse.data(errors.sse_error(self._error_for(event)))
                    break
            yield sse.DONE
        finally:
            # Runs on normal end and when the client disconnects (the generator is cancelled).
            await asyncio.shield(self.close())

    def _chunk(
        self, delta: Delta | None, finish_reason: str | None = None, usage: Usage | None = None
    ) -> str:
        choices = [] if delta is None else [ChunkChoice(delta=delta, finish_reason=finish_reason)]  # type: ignore[arg-type]
        chunk = ChatCompletionChunk(
            id=self.job_id, created=self.created, model=self.model, choices=choices, usage=usage
        )
        exclude = None if self.request.include_usage else {"usage"}
        return chunk.model_dump_json(exclude=exclude)


def _finish_reason(event: events.Finished) -> str:
    # OpenAI's chat API knows "stop" and "length"; hitting the time limit is a budget, like length.
    return "length" if event.finish_reason == "time_limit" else event.finish_reason
