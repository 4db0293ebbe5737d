"""Running the job scripts (tasks/jobs.py) on a Redis client: each registered once per client,
then called by EVALSHA, alone or queued on a pipeline so many go in one round trip."""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript, Script

from tasks import jobs

_ALL = (jobs.ADMIT, jobs.ADMIT_BATCH_LINE, jobs.CLAIM, jobs.APPEND_EVENT, jobs.CANCEL, jobs.REAP)


class Scripts:
    """The worker's side (redis-py, blocking)."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._scripts: dict[str, Script] = {s: client.register_script(s) for s in _ALL}

    def run(self, call: jobs.ScriptCall) -> Any:
        return self._scripts[call.script](keys=call.keys, args=call.args)

    def queue(self, pipe: redis.client.Pipeline, call: jobs.ScriptCall) -> None:
        """Add the call to a pipeline; its result comes back with the pipeline's."""
        self._scripts[call.script](keys=call.keys, args=call.args, client=pipe)


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
            await self._scripts[call.script](keys=call.keys, args=call.args, client=pipe)
        return list(await pipe.execute())
