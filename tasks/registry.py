"""Which models this deployment serves, learned from the workers' heartbeats: the one answer to
"which model, and is it up" for every part of the API (routing, admission, /v1/models, /health,
the browser page).

Each worker announces its model (SERVED_MODEL_NAME, else MODEL_ID) with every heartbeat
(tasks/worker.py): its readiness key carries its description, and two hashes remember when the
model was first and last announced. The API needs no model configuration: a model is *ready*
while at least one worker of it has a fresh heartbeat, *known* for MODEL_FORGET_SECONDS after
its last one (requests then get 503 and may retry), and unknown otherwise (404), as vLLM's
production-stack router tells "never seen" from "temporarily unavailable".
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from tasks import keys

# How long the API reuses one reading of the heartbeats: requests in a burst share one round
# trip, and a worker that just became ready is routed to within about this.
REFRESH_SECONDS = 1.0
# What a 503 for a model without workers tells the client: about a worker's start-up.
RETRY_AFTER_SECONDS = 5


class ModelNotGiven(ValueError):
    """`model` was omitted while several models are served."""


class UnknownModel(LookupError):
    """No worker has ever announced this model (or not within MODEL_FORGET_SECONDS)."""


class ModelUnavailable(RuntimeError):
    """The model is known but no worker of it is ready now; `retry_after` in seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class ServedModel:
    id: str
    created: int  # when a worker first announced it (unix seconds, Redis's clock)
    last_seen: float
    workers: tuple[dict[str, Any], ...] = ()  # the ready workers' own descriptions

    @property
    def ready(self) -> bool:
        return bool(self.workers)

    @property
    def slots(self) -> int:
        return sum(int(w.get("slots") or 0) for w in self.workers)

    @property
    def running(self) -> int:
        """Jobs its workers are generating, as their last heartbeats said."""
        return sum(int(w.get("running") or 0) for w in self.workers)

    def describe(self) -> dict[str, Any]:
        """The model's serving state, as /v1/models' extension and /health show it."""
        first = self.workers[0] if self.workers else {}
        return {
            "ready": self.ready,
            "workers": len(self.workers),
            "slots": self.slots,
            "engine": first.get("engine"),
            "context_length": first.get("context_length"),
        }


@dataclass(frozen=True)
class Models:
    """One reading of the registry."""

    known: dict[str, ServedModel] = field(default_factory=dict)
    workers: tuple[dict[str, Any], ...] = ()  # every ready worker, whatever its model

    @property
    def ready(self) -> list[ServedModel]:
        return [m for m in self.known.values() if m.ready]

    def resolve(self, requested: str | None, can_wait: bool = False) -> str:
        """The model a request goes to. Omitted: the one served model, while there is exactly
        one. Raises ModelNotGiven, UnknownModel or ModelUnavailable. `can_wait` (a batch line,
        which may wait out its batch's window): a known model without workers is accepted.
        """
        if requested is None:
            candidates = list(self.known.values()) if can_wait else self.ready
            if len(candidates) == 1:
                return candidates[0].id
            if not candidates:
                raise ModelUnavailable("No model is being served right now.", RETRY_AFTER_SECONDS)
            names = ", ".join(sorted(m.id for m in candidates))
            raise ModelNotGiven(f"Several models are served ({names}): say which one in 'model'.")
        model = self.known.get(requested)
        if model is None:
            raise UnknownModel(f"The model '{requested}' does not exist.")
        if not model.ready and not can_wait:
            message = f"No worker of the model '{requested}' is running right now; try again shortly."
            raise ModelUnavailable(message, RETRY_AFTER_SECONDS)
        return model.id


class ModelRegistry:
    """The API's view, re-read from Redis at most every REFRESH_SECONDS."""

    def __init__(self, client: aioredis.Redis, forget_seconds: float) -> None:
        self._redis = client
        self._forget = forget_seconds
        self._cached: Models | None = None
        self._read_at = float("-inf")
        self._lock = asyncio.Lock()

    async def models(self, fresh: bool = False) -> Models:
        if not fresh and self._cached is not None and time.monotonic() - self._read_at < REFRESH_SECONDS:
            return self._cached
        async with self._lock:  # one reading for a burst of callers
            if fresh or self._cached is None or time.monotonic() - self._read_at >= REFRESH_SECONDS:
                self._cached = await self._read()
                self._read_at = time.monotonic()
            return self._cached

    async def _read(self) -> Models:
        pipe = self._redis.pipeline(transaction=False)
        pipe.smembers(keys.WORKERS)
        pipe.hgetall(keys.MODELS_CREATED)
        pipe.hgetall(keys.MODELS_SEEN)
        pipe.time()
        names, created, seen, (seconds, micros) = await pipe.execute()
        names = sorted(names)
        values = await self._redis.mget([keys.worker(n) for n in names]) if names else []
        stale = [n for n, v in zip(names, values, strict=True) if v is None]
        if stale:
            await self._redis.srem(keys.WORKERS, *stale)  # type: ignore[misc]
        workers = tuple(json.loads(v) for v in values if v is not None)
        horizon = seconds + micros / 1e6 - self._forget  # Redis's clock, as the announcements
        known: dict[str, ServedModel] = {}
        for name, last in seen.items():
            mine = tuple(w for w in workers if w.get("model") == name)
            if mine or float(last) >= horizon:
                known[name] = ServedModel(name, int(float(created.get(name, last))), float(last), mine)
        return Models(known=known, workers=workers)


# KEYS: created, seen hashes. ARGV: model. Stamped with Redis's clock, which every API host
# compares against, not the worker's own.
_ANNOUNCE = """
local t = redis.call('TIME')
redis.call('HSETNX', KEYS[1], ARGV[1], t[1])
redis.call('HSET', KEYS[2], ARGV[1], t[1] .. '.' .. string.format('%06d', tonumber(t[2])))
"""


def announce(pipe: Any, model: str) -> None:
    """A worker's heartbeat: add the announcement of its model to `pipe` (a sync pipeline)."""
    pipe.eval(_ANNOUNCE, 2, keys.MODELS_CREATED, keys.MODELS_SEEN, model)
