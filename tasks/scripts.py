"""Running the job scripts (tasks/jobs.py) on a Redis client: each registered once per client,
then called by EVALSHA, alone or many in one pipeline (one round trip).

A pipeline carries bare EVALSHAs. redis-py's own way (a registered Script called with
`client=pipe`) sends SCRIPT EXISTS for the pipeline's scripts before every execute: with the
worker's one pipeline per decode step, that was a third of all Redis commands per streamed token
(bench/profile_stream.py). A script is loaded when Redis first answers NOSCRIPT for it (its
first call, a restart, a SCRIPT FLUSH, a failover to a replica that never saw it); the calls it
refused are then run again, in their order, so each job's events stay in order (every caller
puts calls of one script in a pipeline, so none of the others ran ahead of them).

Durability (REDIS_WAIT_REPLICAS): Redis replicates asynchronously, so a failover can lose a write
the master had acknowledged. A call whose write must not be lost (durable(): a job admitted,
claimed or ended) is followed, on the same connection and in the same round trip, by WAIT, which
returns once that many replicas have it or REDIS_WAIT_TIMEOUT_MS passes (then the service goes
on: WAIT bounds the loss, it does not refuse the write).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript, Script
from redis.exceptions import NoScriptError

from tasks import jobs
from tasks.settings import Settings

_ALL = (
    jobs.ADMIT,
    jobs.ADMIT_BATCH_LINE,
    jobs.CLAIM,
    jobs.CLAIM_NEXT,
    jobs.APPEND_EVENT,
    jobs.CANCEL,
    jobs.WITHDRAW,
    jobs.REAP,
    jobs.WAKE_DEFICIT,
    jobs.DELETE_ENDED,
)


log = logging.getLogger(__name__)

# Scripts whose every write must survive a failover; APPEND_EVENT only when it ends the job.
_DURABLE = {
    jobs.ADMIT, jobs.ADMIT_BATCH_LINE, jobs.CLAIM, jobs.CLAIM_NEXT, jobs.CANCEL, jobs.WITHDRAW, jobs.REAP
}  # fmt: skip


def durable(call: jobs.ScriptCall) -> bool:
    return call.script in _DURABLE or (call.script == jobs.APPEND_EVENT and call.args[3] == "1")


@dataclass(frozen=True)
class Wait:
    """WAIT's arguments (REDIS_WAIT_REPLICAS, REDIS_WAIT_TIMEOUT_MS); replicas 0: no WAIT."""

    replicas: int = 0
    timeout_ms: int = 1000

    def needed(self, calls: list[jobs.ScriptCall]) -> bool:
        return self.replicas > 0 and any(durable(c) for c in calls)

    def check(self, acknowledged: Any) -> None:
        """Logs a WAIT that fell short or failed, and raises nothing: the scripts before it were
        applied, so their callers must go on as if it succeeded (a raise here made the API answer
        503 for a job it had admitted, and the worker fail jobs whose events were stored)."""
        if isinstance(acknowledged, Exception):
            log.warning("WAIT failed after a job's write (the write stands): %s", type(acknowledged).__name__)
        elif int(acknowledged) < self.replicas:  # the write stands; a failover now could lose it
            log.warning("WAIT: %s of %s replica(s) acknowledged a job's write", acknowledged, self.replicas)


def wait_of(settings: Settings) -> Wait:
    return Wait(settings.redis_wait_replicas, settings.redis_wait_timeout_ms)


def _evalsha_args(script: Script | AsyncScript, call: jobs.ScriptCall) -> tuple[Any, ...]:
    return (script.sha, len(call.keys), *call.keys, *call.args)


def _refused(results: list[Any]) -> list[int]:
    """Which results are NOSCRIPT; raises the first other error, as `execute()` would have."""
    refused = []
    for i, result in enumerate(results):
        if isinstance(result, NoScriptError):
            refused.append(i)
        elif isinstance(result, Exception):
            raise result
    return refused


class Scripts:
    """The worker's side (redis-py, blocking)."""

    def __init__(self, client: redis.Redis, wait: Wait | None = None) -> None:
        self._client = client
        self._wait = wait or Wait()
        self._scripts: dict[str, Script] = {s: client.register_script(s) for s in _ALL}

    def run(self, call: jobs.ScriptCall) -> Any:
        if self._wait.needed([call]):
            return self.run_many([call])[0]
        # A Script call alone sends EVALSHA and loads the script on NOSCRIPT by itself.
        return self._scripts[call.script](keys=call.keys, args=call.args)

    def run_many(self, calls: list[jobs.ScriptCall]) -> list[Any]:
        """The calls in one round trip, their results in order (then WAIT, if any is durable)."""
        wait = self._wait.needed(calls)
        pipe = self._client.pipeline(transaction=False)
        for call in calls:
            pipe.evalsha(*_evalsha_args(self._scripts[call.script], call))
        if wait:
            pipe.execute_command("WAIT", self._wait.replicas, self._wait.timeout_ms)
        results = list(pipe.execute(raise_on_error=False))
        if wait:
            self._wait.check(results.pop())
        if refused := _refused(results):
            # Loaded, then run again in one round trip of their own (with their WAIT).
            for script in {calls[i].script for i in refused}:
                self._client.script_load(script)
            again = self.run_many([calls[i] for i in refused])
            for i, result in zip(refused, again, strict=True):
                results[i] = result
        return results


class AsyncScripts:
    """The API's side (redis.asyncio)."""

    def __init__(self, client: aioredis.Redis, wait: Wait | None = None) -> None:
        self._client = client
        self._wait = wait or Wait()
        self._scripts: dict[str, AsyncScript] = {s: client.register_script(s) for s in _ALL}

    async def run(self, call: jobs.ScriptCall) -> Any:
        if self._wait.needed([call]):
            return (await self.run_many(self._client, [call]))[0]
        return await self._scripts[call.script](keys=call.keys, args=call.args)

    async def run_many(self, client: aioredis.Redis, calls: list[jobs.ScriptCall]) -> list[Any]:
        """The calls in one round trip (a pipeline), their results in order (then WAIT, if any
        is durable)."""
        wait = self._wait.needed(calls)
        pipe = client.pipeline(transaction=False)
        for call in calls:
            pipe.evalsha(*_evalsha_args(self._scripts[call.script], call))
        if wait:
            pipe.execute_command("WAIT", self._wait.replicas, self._wait.timeout_ms)
        results = list(await pipe.execute(raise_on_error=False))
        if wait:
            self._wait.check(results.pop())
        if refused := _refused(results):
            for script in {calls[i].script for i in refused}:
                await client.script_load(script)
            again = await self.run_many(client, [calls[i] for i in refused])
            for i, result in zip(refused, again, strict=True):
                results[i] = result
        return results
