"""The fair index's scripts (tasks/jobs.py: ADMIT's per-key caps, CLAIM_NEXT, the VTC counters,
WAKE_DEFICIT) against a real redis-server, without a model, called through the typed ScriptCall
API as the API and the workers call them. The module runs in a few seconds.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tasks import events, jobs, keys
from tasks.scripts import Scripts
from tests import needs
from tests.processes import admin_url, start_redis

pytestmark = pytest.mark.integration

TTL = 600
LEASE = 30
QUEUE_TIMEOUT = 3600.0
PAST = -1.0  # a queue timeout that puts every deadline a second in the past, by Redis's clock
MODEL = "m"
# Owner tags sort as named, so ties between counters are broken A before B.
A, B, C = "a" * 32, "b" * 32, "c" * 32
PROMPT = "x" * 40  # estimated at 10 tokens
ESTIMATE = 10
FINISHED = events.Finished(finish_reason="stop", prompt_tokens=3, completion_tokens=2)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if shutil.which("redis-server") is None:
        needs.missing("redis-server", "apt-get install redis-server; .ci/run installs it")
    svc, url = start_redis(Path(tmp_path_factory.mktemp("redis")))
    try:
        yield url
    finally:
        svc.stop()


@pytest.fixture
def db(server: str) -> Iterator[redis.Redis]:
    """The test's own view of Redis, as its admin: it sets up and inspects."""
    client = redis.Redis.from_url(admin_url(server), decode_responses=True, socket_timeout=10)
    client.flushdb()  # each test starts from an empty database
    yield client
    client.close()


@pytest.fixture
def scripts(server: str, db: redis.Redis) -> Iterator[Scripts]:
    """The scripts as the service runs them: as its user, under the README's ACL."""
    client = redis.Redis.from_url(server, decode_responses=True, socket_timeout=10)
    yield Scripts(client)
    client.close()


def new_job(owner: str, batch: str | None = None) -> jobs.NewJob:
    spec = jobs.JobSpec(
        id=jobs.new_job_id("chat"),
        kind="chat",
        model=MODEL,
        messages=[jobs.Message(role="user", content=PROMPT)],
        sampling=jobs.Sampling(max_tokens=4),
        batch=batch,
    )
    return jobs.NewJob(spec=spec, meta=jobs.JobMeta(owner=owner))


def admit(
    scripts: Scripts, owner: str, *, weight: float = 1.0, max_queued: int = 0, max_running: int = 0
) -> str | jobs.OverShare:
    """A job of `owner` admitted (its id), or the share ADMIT refused it for."""
    job = new_job(owner)
    call = jobs.admit(
        job,
        ttl=TTL,
        max_queued=100,
        queue_timeout=QUEUE_TIMEOUT,
        weight=weight,
        max_queued_per_key=max_queued,
        max_running_per_key=max_running,
    )
    reply = jobs.admitted(scripts.run(call))
    if isinstance(reply, jobs.OverShare):
        return reply
    assert reply is not None
    return job.spec.id


def admit_line(db: redis.Redis, scripts: Scripts, owner: str) -> str:
    db.hset(keys.batch("batch_1"), mapping={"status": "in_progress", "expires_at": "9999999999"})
    line = new_job(owner, batch="batch_1")
    assert scripts.run(jobs.admit_batch_line(line, ttl=TTL)) == 1
    return line.spec.id


def claim_next(scripts: Scripts, cap: int = 0, queue_timeout: float = QUEUE_TIMEOUT) -> jobs.Claimed | None:
    call = jobs.claim_next(
        MODEL, ttl=TTL, worker="w1", lease_seconds=LEASE, queue_timeout=queue_timeout, max_running_per_key=cap
    )
    return jobs.claimed(scripts.run(call))


def claim_owner(scripts: Scripts, cap: int = 0) -> str | None:
    got = claim_next(scripts, cap)
    return None if got is None else got.owner


def finish(scripts: Scripts, job_id: str) -> None:
    assert scripts.run(jobs.append(job_id, FINISHED, ttl=TTL)) >= 0


def counter(db: redis.Redis, owner: str, tier: str = "interactive") -> float:
    return float(db.hget(keys.fair_counters(MODEL, tier), owner) or 0)  # type: ignore[arg-type]


def index_is_consistent(db: redis.Redis) -> None:
    """Every backlogged owner has waiting jobs, scored by its counter; nobody else is listed."""
    for tier in keys.TIERS:
        for owner, score in db.zrange(keys.fair_owners(MODEL, tier), 0, -1, withscores=True):
            assert db.zcard(keys.fair_jobs(MODEL, tier, owner)) > 0
            assert score == pytest.approx(counter(db, owner, tier))


def status(db: redis.Redis, job_id: str) -> str | None:
    return db.hget(keys.job(job_id), "status")  # type: ignore[return-value]


# --- the pick ----------------------------------------------------------------------------------


def test_a_slot_goes_to_the_owner_served_least_and_each_owner_runs_its_oldest(
    db: redis.Redis, scripts: Scripts
) -> None:
    a_jobs = [admit(scripts, A) for _ in range(5)]
    b_job = admit(scripts, B)  # B joins at A's counter: both 0, and A's tag sorts first
    first = claim_next(scripts)
    assert first is not None and (first.spec.id, first.owner) == (a_jobs[0], A)
    assert counter(db, A) == ESTIMATE  # charged its estimate at the claim
    second = claim_next(scripts)
    assert second is not None and second.spec.id == b_job  # A's 4 others wait behind B's one
    assert [claim_owner(scripts) for _ in range(4)] == [A] * 4
    assert claim_next(scripts) is None
    index_is_consistent(db)
    assert db.exists(keys.fair_owners(MODEL, "interactive")) == 0
    # The end settles the charge to what the job took: 3 prompt tokens + 2 x 2 completion tokens.
    finish(scripts, b_job)
    assert counter(db, B) == pytest.approx(3 + 2 * 2)


def test_weights_split_the_claims_in_proportion(db: redis.Redis, scripts: Scripts) -> None:
    for _ in range(9):
        admit(scripts, A, weight=2.0)
        admit(scripts, B, weight=1.0)
    owners = [claim_owner(scripts) for _ in range(9)]
    assert (owners.count(A), owners.count(B)) == (6, 3)
    assert counter(db, A) == counter(db, B) == pytest.approx(30)
    index_is_consistent(db)


def test_an_owner_back_from_idle_is_lifted_to_the_least_served_backlogged_one(
    db: redis.Redis, scripts: Scripts
) -> None:
    admit(scripts, B)
    assert claim_owner(scripts) == B  # B's counter: 10; it leaves the index, the last to
    for _ in range(4):
        admit(scripts, A)
    assert counter(db, A) == 10  # arriving at an empty index, A starts from the last one's counter
    for _ in range(3):
        assert claim_owner(scripts) == A  # A alone: its counter grows to 40, one job still waits
    admit(scripts, B)  # B had 10: it banks nothing for the time it was idle
    assert counter(db, B) == counter(db, A) == 40
    assert [claim_owner(scripts), claim_owner(scripts)] == [A, B]  # a tie, then B at 40 < A's 50
    admit(scripts, C)  # nobody waits now: C starts from B's 50, the last to leave
    assert counter(db, C) == 50
    index_is_consistent(db)


def test_interactive_jobs_go_before_batch_lines_whoever_is_served_least(
    db: redis.Redis, scripts: Scripts
) -> None:
    line = admit_line(db, scripts, B)
    job = admit(scripts, A)
    for _ in range(3):  # A has been served more than B ever was
        db.hincrbyfloat(keys.fair_counters(MODEL, "interactive"), A, 100)
    got = claim_next(scripts)
    assert got is not None and got.spec.id == job
    got = claim_next(scripts)
    assert got is not None and got.spec.id == line
    assert counter(db, B, "batch") == ESTIMATE and counter(db, B) == 0  # each tier its own counter


def test_a_claim_ends_jobs_past_their_deadline_and_takes_none_of_them(
    db: redis.Redis, scripts: Scripts
) -> None:
    late = [admit(scripts, A), admit(scripts, B)]
    assert claim_next(scripts, queue_timeout=PAST) is None
    assert [db.hget(keys.job(j), "error_code") for j in late] == ["queue_timeout"] * 2
    index_is_consistent(db)
    assert db.exists(keys.fair_owners(MODEL, "interactive")) == 0


def test_a_stale_index_entry_is_dropped_not_claimed(db: redis.Redis, scripts: Scripts) -> None:
    gone, kept = admit(scripts, A), admit(scripts, A)
    db.delete(keys.job(gone))  # a record expired under its entry (JOB_TTL_SECONDS < the wait)
    got = claim_next(scripts)
    assert got is not None and got.spec.id == kept
    assert db.exists(keys.fair_jobs(MODEL, "interactive", A)) == 0


# --- per-key caps -------------------------------------------------------------------------------


def test_max_queued_per_key_refuses_the_key_only(db: redis.Redis, scripts: Scripts) -> None:
    assert isinstance(admit(scripts, A, max_queued=2), str)
    assert isinstance(admit(scripts, A, max_queued=2), str)
    refused = admit(scripts, A, max_queued=2)
    assert refused == jobs.OverShare("queued")
    assert isinstance(admit(scripts, B, max_queued=2), str)  # another key's share is its own
    assert db.zcard(keys.owner_queued(A)) == 2 and db.zcard(keys.QUEUED) == 3  # nothing left behind
    admit_line(db, scripts, A)  # batch lines count in A's batch tier only
    assert claim_owner(scripts) == A  # a claimed job stops counting as waiting
    assert isinstance(admit(scripts, A, max_queued=2), str)


def test_max_running_per_key_refuses_admission_and_holds_the_claim(db: redis.Redis, scripts: Scripts) -> None:
    first, second = admit(scripts, A), admit(scripts, A)
    b_job = admit(scripts, B)
    got = claim_next(scripts, cap=1)
    assert got is not None and got.spec.id == first
    assert admit(scripts, A, max_running=1) == jobs.OverShare("running")
    got = claim_next(scripts, cap=1)
    assert got is not None and got.spec.id == b_job  # A is at its cap: B's job goes first
    assert claim_next(scripts, cap=1) is None  # only A's job waits, and A is at its cap
    assert scripts.run(jobs.wake_deficit(MODEL, max_running_per_key=1)) == [0, 0]
    finish(scripts, first)
    assert scripts.run(jobs.wake_deficit(MODEL, max_running_per_key=1)) == [1, 0]
    got = claim_next(scripts, cap=1)
    assert got is not None and got.spec.id == second


def test_a_running_batch_line_does_not_use_the_keys_interactive_share(
    db: redis.Redis, scripts: Scripts
) -> None:
    line = admit_line(db, scripts, A)
    got = claim_next(scripts, cap=1)
    assert got is not None and got.spec.id == line
    assert db.scard(keys.owner_running(A)) == 0
    job = admit(scripts, A, max_queued=1, max_running=1)
    assert isinstance(job, str)
    got = claim_next(scripts, cap=1)
    assert got is not None and got.spec.id == job


# --- every ending empties the counts -----------------------------------------------------------


def _finish(db: redis.Redis, scripts: Scripts, job_id: str) -> None:
    finish(scripts, job_id)


def _fail(db: redis.Redis, scripts: Scripts, job_id: str) -> None:
    failed = events.Failed(code="internal_error", message="The generation failed.")
    assert scripts.run(jobs.append(job_id, failed, ttl=TTL)) >= 0


def _cancel(db: redis.Redis, scripts: Scripts, job_id: str) -> None:
    scripts.run(jobs.cancel(job_id, ttl=TTL))
    if status(db, job_id) == "in_progress":  # its worker ends it, between tokens
        assert scripts.run(jobs.append(job_id, jobs.cancelled_event(3, 1), ttl=TTL)) >= 0


def _reap_queue_timeout(db: redis.Redis, scripts: Scripts, job_id: str) -> None:
    assert int(scripts.run(jobs.reap(ttl=TTL, queue_timeout=PAST))) == 1


def _lose_worker(db: redis.Redis, scripts: Scripts, job_id: str) -> None:
    db.delete(keys.job_lease(job_id))  # what the lease's expiry does when its worker dies
    assert int(scripts.run(jobs.reap(ttl=TTL, queue_timeout=QUEUE_TIMEOUT))) == 1


# name: (claimed first?, how it ends, the status it ends in)
ENDINGS: dict[str, tuple[bool, Callable[[redis.Redis, Scripts, str], None], str]] = {
    "finished": (True, _finish, "completed"),
    "failed": (True, _fail, "failed"),
    "cancelled while queued": (False, _cancel, "cancelled"),
    "cancelled while running": (True, _cancel, "cancelled"),
    "queue timeout, reaped": (False, _reap_queue_timeout, "failed"),
    "worker lost, reaped": (True, _lose_worker, "failed"),
}


@pytest.mark.parametrize("name", ENDINGS)
def test_the_keys_counts_return_to_zero_after_every_ending(
    db: redis.Redis, scripts: Scripts, name: str
) -> None:
    start_running, end, ended_as = ENDINGS[name]
    job_id = admit(scripts, A, max_queued=1, max_running=1)
    assert isinstance(job_id, str)
    if start_running:
        assert claim_next(scripts, cap=1) is not None
        assert db.scard(keys.owner_running(A)) == 1 and db.zcard(keys.owner_queued(A)) == 0
    else:
        assert db.zcard(keys.owner_queued(A)) == 1
    end(db, scripts, job_id)
    assert status(db, job_id) == ended_as
    assert db.scard(keys.owner_running(A)) == 0 and db.zcard(keys.owner_queued(A)) == 0
    assert db.exists(keys.fair_jobs(MODEL, "interactive", A), keys.fair_owners(MODEL, "interactive")) == 0
    assert isinstance(admit(scripts, A, max_queued=1, max_running=1), str)  # the share is free again


# --- withdraw and wake-ups ----------------------------------------------------------------------


def test_a_withdrawn_job_leaves_no_trace_unless_it_was_claimed(db: redis.Redis, scripts: Scripts) -> None:
    job_id = admit(scripts, A)
    assert isinstance(job_id, str)
    assert scripts.run(jobs.withdraw(job_id)) == 1
    assert db.exists(keys.job(job_id), keys.owner_queued(A), keys.fair_owners(MODEL, "interactive")) == 0
    claimed_id = admit(scripts, A)
    assert isinstance(claimed_id, str) and claim_next(scripts) is not None
    assert scripts.run(jobs.withdraw(claimed_id)) == 0 and status(db, claimed_id) == "in_progress"


def test_the_wake_deficit_counts_claimable_jobs_against_messages_of_both_lists(
    db: redis.Redis, scripts: Scripts
) -> None:
    for owner in (A, A, B):
        admit(scripts, owner)
    admit_line(db, scripts, C)
    assert scripts.run(jobs.wake_deficit(MODEL, max_running_per_key=0)) == [4, 0]
    interactive, batch = keys.generate_lists(MODEL)
    db.lpush(interactive, "m1")
    db.lpush(batch, "m2", "m3")
    assert scripts.run(jobs.wake_deficit(MODEL, max_running_per_key=0)) == [4, 3]


def test_one_claim_ends_a_bounded_number_of_jobs_then_asks_to_be_called_again(
    db: redis.Redis, scripts: Scripts
) -> None:
    late = [admit(scripts, A) for _ in range(jobs.CLAIM_NEXT_ENDINGS + 5)]
    call = jobs.claim_next(
        MODEL, ttl=TTL, worker="w1", lease_seconds=LEASE, queue_timeout=PAST, max_running_per_key=0
    )
    first = scripts.run(call)
    assert jobs.claim_again(first) and jobs.claimed(first) is None
    assert sum(status(db, j) == "failed" for j in late) == jobs.CLAIM_NEXT_ENDINGS
    second = scripts.run(call)
    assert not jobs.claim_again(second) and jobs.claimed(second) is None
    assert {status(db, j) for j in late} == {"failed"}
