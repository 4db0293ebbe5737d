"""The service stays under its prefix: against a Redis whose default user may touch only keys
and channels under `llmq:`, chat completions (blocking and streamed), a background response, a
batch (files, the batch priority list) and Celery's remote control all work, and Redis denies
nothing to anyone (the API, the worker's threads, kombu, Celery's events)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator

import openai
import pytest

from tasks import keys
from tests.integration.conftest import Stack, running_stack
from tests.integration.helpers import rdb, sdk, wait_batch, wait_response
from tests.processes import BIN, ROOT

# The rules README "Redis" gives an operator who shares one Redis between services: every key
# and channel under the prefix, and, since a Redis ACL matches PSUBSCRIBE patterns literally,
# the two patterns kombu listens with (tasks/redis.py, `fanout_patterns`) for database 0.
RULES = ["~llmq:*", "&llmq:*", "&llmq:/0.celeryev", "&llmq:/0.celery.pidbox", "+@all"]
# redis-server takes a config line on its command line: `user default ...` sets the default
# user's rights, which every client here uses.
CONFINED = ["--user", "default", "on", "nopass", "resetkeys", "resetchannels", *RULES]


@pytest.fixture(scope="module")
def confined(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("acl"), redis_args=CONFINED) as stack:
        yield stack


@pytest.mark.timeout(420)
def test_a_redis_confined_to_the_prefix_serves_everything_and_denies_nothing(confined: Stack) -> None:
    db = rdb(confined)
    # The rule is in force (DRYRUN asks without logging a denial): otherwise this proves nothing.
    assert db.execute_command("ACL", "DRYRUN", "default", "SET", f"{keys.PREFIX}x", "1") == "OK"
    assert "no permissions" in db.execute_command("ACL", "DRYRUN", "default", "SET", "generate", "1")
    assert "no permissions" in db.execute_command("ACL", "DRYRUN", "default", "PUBLISH", "celeryev", "1")
    # Denials while the worker started (kombu's bindings and listeners) stop it: say so at once.
    assert db.acl_log() == []
    client = sdk(confined, timeout=60)
    model = client.models.list().data[0].id
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [{"role": "user", "content": "Hi"}]

    blocking = client.chat.completions.create(model=model, messages=messages, max_tokens=4)
    assert blocking.choices[0].finish_reason in ("stop", "length")

    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=4, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")

    background = client.responses.create(model=model, input="Hi", max_output_tokens=4, background=True)
    response = wait_response(client, background.id, timeout=120)
    assert response.status in ("completed", "incomplete"), response.error

    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body}
    uploaded = client.files.create(file=("in.jsonl", json.dumps(line).encode() + b"\n"), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch = wait_batch(client, batch.id, {"completed", "failed", "expired"})
    assert batch.status == "completed" and batch.request_counts is not None
    assert batch.request_counts.completed == 1, batch

    # Remote control (what `celery inspect`, compose's health check and Flower use): a broadcast
    # on a pub/sub channel, answered through a reply queue.
    env = {**os.environ, **confined.env}
    ping = subprocess.run(
        [str(BIN / "celery"), "-A", "tasks", "inspect", "ping", "--timeout", "10"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ping.returncode == 0 and ": OK" in ping.stdout, ping.stdout + ping.stderr

    # Nothing anyone did was refused, including what the processes only log (heartbeats, kombu's
    # bookkeeping of unacknowledged messages, task events).
    assert db.acl_log() == []
