"""Running the job scripts (tasks/jobs.py) on a Redis client: each registered once per client,
then called by EVALSHA, alone or many in one pipeline (one round trip).

A pipeline carries bare EVALSHAs. redis-py's own way (a registered Script called with
`client=pipe`) sends SCRIPT EXISTS for the pipeline's scripts before every execute: with the
worker's one pipeline per decode step, that was a third of all Redis commands per streamed token
(bench/profile_stream.py). A script is loaded when Redis first answers NOSCRIPT for it (its
first call, a restart, a SCRIPT FLUSH, a failover to a replica that never saw it); the calls it
refused are then run again, in their order, so each job's events stay in order (every caller
puts calls of one script in a pipeline, so none of the others ran ahead of them).
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript, Script
from redis.exceptions import NoScriptError

from tasks import jobs

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

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._scripts: dict[str, Script] = {s: client.register_script(s) for s in _ALL}

    def run(self, call: jobs.ScriptCall) -> Any:
        # A Script call alone sends EVALSHA and loads the script on NOSCRIPT by itself.
        return self._scripts[call.script](keys=call.keys, args=call.args)

    def run_many(self, calls: list[jobs.ScriptCall]) -> list[Any]:
        """The calls in one round trip, their results in order."""
        pipe = self._client.pipeline(transaction=False)
        for call in calls:
            pipe.evalsha(*_evalsha_args(self._scripts[call.script], call))
        results = list(pipe.execute(raise_on_error=False))
        for i in _refused(results):
            results[i] = self.run(calls[i])
        return results


class AsyncScripts:
    """The API's side (redis.asyncio)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._scripts: dict[str, AsyncScript] = {s: client.register_script(s) for s in _ALL}

    async def run(self, call: jobs.ScriptCall) -> Any:
        return await self._scripts[call.script](keys=call.keys, args=call.args)

    async def run_many(self, client: aioredis.Redis, calls: list[jobs.ScriptCall]) -> list[Any]:
        """The calls in one round trip (a pipeline), their results in order."""
        pipe = client.pipeline(transaction=False)
        for call in calls:
            pipe.evalsha(*_evalsha_args(self._scripts[call.script], call))
        results = list(await pipe.execute(raise_on_error=False))
        for i in _refused(results):
            results[i] = await self.run(calls[i])
        return results
