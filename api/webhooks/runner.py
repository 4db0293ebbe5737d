"""Delivering webhooks: every API instance with endpoints registered runs this loop.

Why here and not as a Celery task: a delivery is an HTTP POST that waits on someone else's
server, for up to WEBHOOK_TIMEOUT_SECONDS, and is retried for days. On a worker it would hold a
pool thread, which is a decode slot (celeryconfig.py), and queue behind generations; the API
process is asynchronous, already runs the batch runner and the reaper the same way, and is
where a receiver's slowness costs nothing but a coroutine. Every instance runs the loop; Redis
decides who does what (tasks/webhooks.py): an ending is fanned out once, by whichever instance
moves the cursor past it, and a delivery is sent by whichever takes it when due. An instance
killed mid-way leaves its work to the others: entries after the cursor stay, and a delivery it
held becomes due again once the hold (the send's timeout and a margin) has passed.

Each step is bounded: FAN_OUT_CHUNK endings read per tick, WEBHOOK_MAX_IN_FLIGHT sends at once
per instance, a response body never read. Only the deliveries' own records grow with a receiver
that is down, and each lives at most the retry window plus JOB_TTL_SECONDS.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

import httpx
import redis.exceptions

from api.webhooks.endpoints import Endpoint, Event, batch_event, job_event, signed_headers
from tasks import logs
from tasks.settings import Settings
from tasks.webhooks import Due, NewDelivery, WebhookStore

log = logging.getLogger(__name__)

TICK_SECONDS = 0.2  # how soon an ending is fanned out, and a due delivery sent
FAN_OUT_CHUNK = 200  # endings read per tick
# How long a taken delivery stays this instance's: past the send's own bound (the timeout) with
# room for recording it, yet short, as it is what a killed instance's deliveries wait for.
HOLD_MARGIN_SECONDS = 5


class WebhookRunner:
    def __init__(self, store: WebhookStore, endpoints: list[Endpoint], settings: Settings) -> None:
        self._store = store
        self._endpoints = {e.id: e for e in endpoints}
        self._settings = settings
        self._started = False
        self._sending: set[asyncio.Task[None]] = set()

    async def run_forever(self) -> None:
        # Redirects are not followed: a receiver answers 2xx itself, or the attempt failed. The
        # standard proxy variables (HTTPS_PROXY, NO_PROXY) apply, as to any egress of the host.
        limits = httpx.Limits(max_connections=self._settings.webhook_max_in_flight)
        async with httpx.AsyncClient(follow_redirects=False, limits=limits) as http:
            try:
                while True:
                    await asyncio.sleep(TICK_SECONDS)
                    try:
                        await self.step(http)
                    except (redis.exceptions.RedisError, OSError) as exc:
                        log.warning("webhooks paused: %s", exc)
                    except Exception:  # a bug: log it, and carry on with the next tick
                        log.exception("webhooks: step failed")
            finally:
                for task in self._sending:
                    task.cancel()

    async def step(self, http: httpx.AsyncClient) -> None:
        if not self._started:
            await self._store.start_cursor()
            self._started = True
        await self.fan_out()
        room = self._settings.webhook_max_in_flight - len(self._sending)
        if room <= 0:
            return
        hold = 2 * self._settings.webhook_timeout_seconds + HOLD_MARGIN_SECONDS
        for due in await self._store.claim_due(room, hold):
            task = asyncio.create_task(self._send_logged(http, due))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def fan_out(self) -> None:
        """The endings after the cursor, as one delivery per event and endpoint that wants it."""
        cursor, entries = await self._store.endings(FAN_OUT_CHUNK)
        if not entries:
            return
        responses = [(i, e) for i, e in entries if e and e.kind == "response" and not e.batch]
        batches = [(i, e) for i, e in entries if e and e.kind == "batch"]
        metas = await self._store.job_fields([e.id for _, e in responses])
        specs = await self._store.batch_specs([e.id for _, e in batches])
        events: list[Event | None] = [
            job_event(i, e, meta) for (i, e), (meta, _) in zip(responses, metas, strict=True)
        ]
        for (i, e), spec in zip(batches, specs, strict=True):
            events.append(batch_event(i, e, spec))
        deliveries: list[NewDelivery] = []
        for event in events:
            if event is None:
                continue
            for endpoint in self._endpoints.values():
                if endpoint.wants(event.type, event.owner):
                    delivery_id = f"{event.id}.{endpoint.id}"
                    body = event.body()
                    deliveries.append(
                        NewDelivery(
                            delivery_id,
                            event.created_at,
                            event.id,
                            event.type,
                            event.subject,
                            endpoint.id,
                            body,
                        )
                    )
        retry_seconds = self._settings.webhook_retry_seconds
        open_ttl = retry_seconds + self._settings.job_ttl_seconds
        moved = await self._store.fan_out(
            cursor, entries[-1][0], deliveries, open_ttl=open_ttl, retry_seconds=retry_seconds
        )
        if moved:
            for d in deliveries:
                logs.job_id_var.set(d.subject)
                log.info("webhook event %s (%s) to deliver to endpoint %s", d.event_id, d.type, d.endpoint)
            logs.job_id_var.set(None)

    async def _send_logged(self, http: httpx.AsyncClient, due: Due) -> None:
        try:
            await self._send(http, due)
        except Exception:  # a bug: its hold runs out and the delivery is sent again
            log.exception("webhook event %s: send failed", due.event_id)

    async def _send(self, http: httpx.AsyncClient, due: Due) -> None:
        logs.job_id_var.set(due.subject)  # this task's own context: every line names the job or batch
        endpoint = self._endpoints.get(due.endpoint)
        started = time.time()
        status_code: int | None = None
        error = ""
        if endpoint is None:  # settings differ between instances: one that has it will send it
            error = "endpoint not registered on this API instance"
        else:
            try:
                status_code = await asyncio.wait_for(
                    self._post(http, endpoint, due), timeout=self._settings.webhook_timeout_seconds
                )
                if not 200 <= status_code < 300:
                    error = f"HTTP {status_code}"
            except (asyncio.TimeoutError, httpx.TimeoutException):
                error = f"no answer within {self._settings.webhook_timeout_seconds:g} s"
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"[:300]
        ok = not error
        delay = self._backoff(due.attempts)
        attempt: dict[str, Any] = {
            "at": round(started, 3),
            "status": status_code,
            "error": error or None,
            "seconds": round(time.time() - started, 3),
        }
        try:
            state = await self._store.record(
                due.id,
                ok=ok,
                attempt=attempt,
                delay=delay,
                retry_seconds=self._settings.webhook_retry_seconds,
                status_code=status_code,
                error=error,
            )
        except (redis.exceptions.RedisError, OSError) as exc:  # the hold runs out; it is sent again
            log.warning("webhook event %s: attempt not recorded: %s", due.event_id, exc)
            return
        url = endpoint.url if endpoint else due.endpoint
        if state == "delivered":
            log.info(
                "webhook event %s (%s) delivered to %s, attempt %d",
                due.event_id,
                due.type,
                url,
                due.attempts + 1,
            )
        elif state == "failed":
            log.error("webhook event %s (%s) to %s failed for good: %s", due.event_id, due.type, url, error)
        elif state == "pending":
            log.warning(
                "webhook event %s (%s) to %s: %s; retry in %.1f s", due.event_id, due.type, url, error, delay
            )

    async def _post(self, http: httpx.AsyncClient, endpoint: Endpoint, due: Due) -> int:
        body = due.body.encode()
        headers = signed_headers(endpoint.key, due.event_id, body)
        # Streamed, and closed unread: only the status matters, whatever size a receiver answers.
        async with http.stream("POST", endpoint.url, content=body, headers=headers) as response:
            return response.status_code

    def _backoff(self, attempts_before: int) -> float:
        """Exponential, capped, with jitter (half to all of it), so that the retries of many
        events a receiver refused at once do not all arrive at once again."""
        s = self._settings
        ceiling = min(
            s.webhook_backoff_max_seconds, s.webhook_backoff_seconds * 2 ** min(attempts_before, 30)
        )
        return ceiling * random.uniform(0.5, 1.0)
