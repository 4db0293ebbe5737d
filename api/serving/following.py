"""Following one job from enqueue to its terminal event: the one way every endpoint does it.

Chat completions, responses and batches all submit jobs and read their events; what differs is
only the view each protocol builds from those events (api/chat_completion/serving.py,
api/responses/serving.py). The mechanics live here once: subscribe before enqueueing (so no
event can be missed), read under a deadline, notice a client that went away, and cancel a job
whose follower gives up on it, so it never runs to the end for nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import redis.exceptions
from starlette.types import Receive

from api import errors
from tasks import events, jobs
from tasks.client import EventFollower, JobClient

log = logging.getLogger(__name__)

# How often a waiting follower checks that its client is still there.
DISCONNECT_POLL_SECONDS = 0.5


class ClientWatch:
    """Notices that the client of a blocking request has hung up.

    It waits in `receive` for the disconnect message, as Starlette's StreamingResponse does for
    streams, instead of polling `Request.is_disconnected()` around every read. Start it once the
    body has been read; the follow checks `gone` before each read of the job's events.
    """

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self.gone = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def __enter__(self) -> ClientWatch:
        self._task = asyncio.create_task(self._listen())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _listen(self) -> None:
        while True:  # ends with the disconnect message, or is cancelled when the response is ready
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.gone.set()
                return


class Follow:
    """One job: subscribed, enqueued, read event by event until it ends or is given up.

    Giving up (the deadline, the client gone, Redis lost, the caller stopping early) cancels the
    job, unless `cancel_on_close` is False (a background job outlives the request that made it).
    """

    def __init__(
        self,
        client: JobClient,
        job_id: str,
        *,
        timeout_seconds: float,
        gone: asyncio.Event | None = None,
        cancel_on_close: bool = True,
    ) -> None:
        self.job_id = job_id
        self._client = client
        self._deadline = time.monotonic() + timeout_seconds
        self._gone = gone
        self._cancel_on_close = cancel_on_close
        self._follower: EventFollower | None = None
        # The follower's subscription, left when the follow closes (not a `with` block: a
        # stream's generator holds it across yields, and close() can come from either side).
        self._subscription = contextlib.AsyncExitStack()
        self._owns_job = False
        self.ended = False

    async def submit(self, job: jobs.NewJob) -> float:
        """Subscribe, then enqueue the job; on any failure nothing is left subscribed. Returns
        the job's created_at."""
        try:
            with errors.queue_errors():
                await self.attach()
                created_at = await self._client.create(job)
        except BaseException:
            await asyncio.shield(self.close())
            raise
        self._owns_job = True
        return created_at

    async def attach(self) -> None:
        """Subscribe to an existing job's events (resuming a stream)."""
        self._follower = await self._subscription.enter_async_context(self._client.subscribe(self.job_id))

    async def next(self, wait: float | None = None) -> events.AnyEvent | None:
        """The next event; None if `wait` seconds pass first (the read stays pending). Raises
        Timeout past the deadline, ClientDisconnected when the client has gone,
        ServiceUnavailable when Redis is lost.
        """
        assert self._follower is not None, "submit or attach first"
        give_up = self._deadline if wait is None else min(self._deadline, time.monotonic() + wait)
        while True:
            # Checked before every read, not only after a quiet slice: a running job's events
            # arrive every few milliseconds, so a quiet slice may never come.
            if self._gone is not None and self._gone.is_set():
                raise errors.ClientDisconnected("The client closed the request.")
            slice_seconds = min(max(give_up - time.monotonic(), 0.0), DISCONNECT_POLL_SECONDS)
            try:
                event = await self._follower.next(slice_seconds)
            except redis.exceptions.RedisError as exc:
                log.warning("lost Redis while following %s", self.job_id)
                raise errors.ServiceUnavailable("Lost the connection to the queue.") from exc
            if event is not None:
                self.ended = events.is_terminal(event)
                return event
            if time.monotonic() >= give_up:
                if give_up < self._deadline:
                    return None
                raise errors.Timeout("The generation did not finish within the request timeout.")

    async def first(
        self, wait: float | None, refusal: Callable[[events.AnyEvent], errors.APIError | None]
    ) -> events.AnyEvent | None:
        """The job's first event, waited for up to `wait` seconds (None: until it comes; None
        back if it does not come in time). An event for which `refusal` gives an error closes the
        follow and raises that error: the request is answered with it (a prompt the worker
        refused before starting is an HTTP error for streams too, as OpenAI's are). Closed on
        any other way out as well, so the job is not left running for nobody."""
        try:
            first = await self.next(wait)
        except BaseException:
            await asyncio.shield(self.close())
            raise
        if first is not None and (error := refusal(first)) is not None:
            await self.close()
            raise error
        return first

    async def close(self) -> None:
        """Release the subscription; a job this follow submitted and that has not ended is
        cancelled (nobody is reading it any more). Safe to call twice."""
        try:
            if self._owns_job and self._cancel_on_close and not self.ended:
                await self._client.cancel(self.job_id)
        except redis.exceptions.RedisError:
            log.warning("could not cancel abandoned job %s", self.job_id)
        finally:
            self.ended = True
            self._follower = None
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                await self._subscription.aclose()
