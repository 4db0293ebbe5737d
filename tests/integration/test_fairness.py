"""Fair shares between API keys on the real stack, through the official SDK: one key's long queue
does not hold back another key's request (the fair index, tasks/jobs.py CLAIM_NEXT), and
MAX_QUEUED_PER_KEY / MAX_RUNNING_PER_KEY answer 429 before anything is queued, with their counts
back to zero after the jobs end; a batch's lines never use their key's interactive share.

Orders and counts are read from the job records (Redis's clock), never from timings here.
"""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from api.edge.auth import owner_tag
from tasks import keys
from tests.integration.conftest import Preset, Stack, stack_fixture
from tests.integration.helpers import (
    LONG_PROMPT,
    rdb,
    sdk,
    start_long_response,
    wait_batch,
    wait_for,
    wait_records,
)

pytestmark = pytest.mark.integration

KEY_A, KEY_B, KEY_C = "fair-key-a", "fair-key-b", "fair-key-c"
SLOTS = 2
MAX_QUEUED_PER_KEY = 50
MAX_RUNNING_PER_KEY = 2
A_JOBS = 50
SHORT_TOKENS = 8  # A's jobs: short, to keep the module fast

fair = stack_fixture(
    Preset.api_keys(KEY_A, KEY_B, KEY_C)
    .with_(
        WORKER_SLOTS=str(SLOTS),
        MAX_QUEUED_PER_KEY=str(MAX_QUEUED_PER_KEY),
        MAX_RUNNING_PER_KEY=str(MAX_RUNNING_PER_KEY),
        API_KEY_WEIGHTS=f"{KEY_A}=2",  # A's share is twice B's: B is still served at once
    )
    .named("fairness")
)


def short_response(client: openai.OpenAI) -> str:
    """A background response of SHORT_TOKENS tokens (ignore_eos: every one as long); its id."""
    return client.responses.create(
        input="Say hello.",
        max_output_tokens=SHORT_TOKENS,
        temperature=0,
        background=True,
        extra_body={"ignore_eos": True},
    ).id


def shares_are_empty(stack: Stack, *api_keys: str) -> None:
    """No key's waiting or running count, and nothing in the fair index, is left over."""
    db = rdb(stack)
    for key in api_keys:
        owner = owner_tag(key)
        assert (db.zcard(keys.owner_queued(owner)), db.scard(keys.owner_running(owner))) == (0, 0)
    assert db.keys(f"{keys.FAIR_JOBS}*") == [] and db.keys(f"{keys.FAIR_OWNERS}*") == []


def ended_once(stack: Stack, job_ids: list[str]) -> None:
    """Each job is in the ended stream exactly once."""
    ended = [fields["id"] for _, fields in rdb(stack).xrange(keys.ENDED)]
    assert [ended.count(j) for j in job_ids] == [1] * len(job_ids)


def test_one_keys_long_queue_does_not_hold_back_another_keys_request(fair: Stack) -> None:
    a, b, c = sdk(fair, KEY_A), sdk(fair, KEY_B), sdk(fair, KEY_C)
    # C's long generations hold both slots while A queues its 50 and B its one, so all of A's
    # wait when B's arrives, whatever the machine's speed (and A, with nothing running, stays
    # under MAX_RUNNING_PER_KEY while it sends them).
    blockers = [start_long_response(c) for _ in range(SLOTS)]
    wait_records(fair, blockers, {"in_progress"}, timeout=60)
    a_ids = [short_response(a) for _ in range(A_JOBS)]
    b_id = short_response(b)
    for blocker in blockers:
        c.responses.cancel(blocker)
    records = wait_records(fair, [*a_ids, b_id], timeout=300)
    b_record, a_records = records[-1], records[:-1]
    admitted, started = float(b_record["created_at"]), float(b_record["started_at"])
    a_starts = [float(r["started_at"]) for r in a_records]
    assert min(a_starts) > admitted  # first-in, first-out would have run all 50 before B's
    # B waits for the slots to free and one more pick at most, not for A's queue.
    assert sum(s < started for s in a_starts) <= SLOTS + 1
    assert {r["status"] for r in records} <= {"completed", "incomplete"}
    assert {r["weight"] for r in a_records} == {"2.0"} and b_record["weight"] == "1.0"
    wait_records(fair, blockers, timeout=60)
    ended_once(fair, [*a_ids, b_id, *blockers])
    shares_are_empty(fair, KEY_A, KEY_B, KEY_C)


def _rate_limited(error: openai.RateLimitError) -> None:
    body: Any = error.body
    assert (body["type"], body["code"]) == ("requests", "rate_limit_exceeded")
    assert int(error.response.headers["retry-after"]) >= 1


def test_a_key_over_its_share_gets_429_before_anything_is_queued(fair: Stack) -> None:
    a, c = sdk(fair, KEY_A), sdk(fair, KEY_C)
    db = rdb(fair)
    # C's long generations fill both slots: C is at MAX_RUNNING_PER_KEY.
    long_ids = [start_long_response(c) for _ in range(MAX_RUNNING_PER_KEY)]
    wait_records(fair, long_ids, {"in_progress"}, timeout=60)
    queued_before = db.zcard(keys.QUEUED)
    with pytest.raises(openai.RateLimitError) as over_running:
        c.chat.completions.create(model=_model(c), messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    _rate_limited(over_running.value)
    # Nothing runs for A meanwhile, so all of A's requests wait: the 51st is over its share.
    a_ids = [short_response(a) for _ in range(MAX_QUEUED_PER_KEY)]
    with pytest.raises(openai.RateLimitError) as over_queued:
        short_response(a)
    _rate_limited(over_queued.value)
    assert db.zcard(keys.QUEUED) == queued_before + MAX_QUEUED_PER_KEY  # the refused left nothing
    b_id = short_response(sdk(fair, KEY_B))  # other keys' shares are their own
    for job_id in a_ids:
        a.responses.cancel(job_id)
    for job_id in long_ids:
        c.responses.cancel(job_id)
    records = wait_records(fair, [*a_ids, *long_ids], timeout=60)
    assert {r["status"] for r in records} == {"cancelled"}
    ended_once(fair, [*a_ids, *long_ids])
    wait_records(fair, [b_id], timeout=120)
    shares_are_empty(fair, KEY_A, KEY_B, KEY_C)


def _model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def _batch_input(count: int) -> bytes:
    body = {
        "messages": [{"role": "user", "content": LONG_PROMPT}],
        "max_tokens": 3000,
        "temperature": 0,
        "ignore_eos": True,
    }
    lines = [
        {"custom_id": f"long{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        for i in range(count)
    ]
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def test_running_batch_lines_do_not_use_the_keys_interactive_share(fair: Stack) -> None:
    c = sdk(fair, KEY_C)
    db = rdb(fair)
    uploaded = c.files.create(file=("input.jsonl", _batch_input(SLOTS)), purpose="batch")
    batch = c.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    owner = owner_tag(KEY_C)
    # As many of C's lines run as MAX_RUNNING_PER_KEY allows interactive jobs...
    wait_for(lambda: db.scard(keys.BATCH_RUNNING) >= MAX_RUNNING_PER_KEY, 60, "C's batch lines running")
    assert db.scard(keys.owner_running(owner)) == 0
    # ...and C's interactive requests are still admitted: the lines count in C's batch tier only.
    ids = [short_response(c) for _ in range(MAX_RUNNING_PER_KEY)]
    c.batches.cancel(batch.id)
    assert wait_batch(c, batch.id, {"cancelled"}).status == "cancelled"
    records = wait_records(fair, ids, timeout=120)
    assert {r["status"] for r in records} <= {"completed", "incomplete"}
    shares_are_empty(fair, KEY_C)


def test_a_job_whose_wake_up_was_lost_runs_after_the_reapers_repair(fair: Stack) -> None:
    a, c = sdk(fair, KEY_A), sdk(fair, KEY_C)
    db = rdb(fair)
    long_ids = [start_long_response(c) for _ in range(SLOTS)]
    wait_records(fair, long_ids, {"in_progress"}, timeout=60)
    job_id = short_response(a)
    # What a Sentinel failover can do to a broker push: the job is queued, its message gone.
    assert db.delete(*keys.generate_lists(_model(a))) >= 1
    for long_id in long_ids:
        c.responses.cancel(long_id)
    (record,) = wait_records(fair, [job_id], timeout=60)
    assert record["status"] in ("completed", "incomplete")
    assert "wake-up(s) for jobs whose message was missing" in fair.api.log_path.read_text()
    shares_are_empty(fair, KEY_A, KEY_C)
