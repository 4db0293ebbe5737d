"""The job record's Lua scripts (tasks/jobs.py) against a real redis-server, without a model:
admission, claims, endings, cancel and reaping, called through the typed ScriptCall API as the
API and the workers call them. The module runs in a few seconds.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

from tasks import events, jobs, keys
from tasks.scripts import Scripts, Wait, durable
from tests import needs
from tests.integration.conftest import assert_no_denials
from tests.processes import admin_url, start_redis

pytestmark = pytest.mark.integration

TTL = 600
LEASE = 30
QUEUE_TIMEOUT = 3600.0  # no job in these tests waits this long: only a deadline set in the past hits
PAST = -1.0  # a queue timeout that puts every deadline a second in the past, by Redis's clock
FINISHED = events.Finished(finish_reason="stop", prompt_tokens=3, completion_tokens=2)
FAILED = events.Failed(code="internal_error", message="The generation failed.")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if shutil.which("redis-server") is None:
        needs.missing("redis-server", "apt-get install redis-server; .ci/run installs it")
    svc, url = start_redis(Path(tmp_path_factory.mktemp("redis")))
    try:
        yield url
        assert_no_denials(url)  # the scripts ran as the service's user, under its ACL
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


def new_job(kind: jobs.JobKind = "chat", batch: str | None = None, owner: str | None = "tag") -> jobs.NewJob:
    spec = jobs.JobSpec(
        id=jobs.new_job_id(kind),
        kind=kind,
        model="m",
        messages=[jobs.Message(role="user", content="Hi")],
        sampling=jobs.Sampling(max_tokens=4),
        batch=batch,
    )
    response = jobs.ResponseOptions(metadata={"k": "v"}) if kind == "response" else None
    return jobs.NewJob(spec=spec, meta=jobs.JobMeta(owner=owner, response=response))


def admit(scripts: Scripts, job: jobs.NewJob, max_queued: int = 100) -> float | None:
    call = jobs.admit(job, ttl=TTL, max_queued=max_queued, queue_timeout=QUEUE_TIMEOUT)
    return jobs.admitted(scripts.run(call))


def queued(scripts: Scripts, kind: jobs.JobKind = "chat") -> str:
    job = new_job(kind)
    assert admit(scripts, job) is not None
    return job.spec.id


def claim(scripts: Scripts, job_id: str, queue_timeout: float = QUEUE_TIMEOUT) -> jobs.Claimed | None:
    call = jobs.claim(job_id, ttl=TTL, worker="w1", lease_seconds=LEASE, queue_timeout=queue_timeout)
    return jobs.claimed(scripts.run(call))


def running(scripts: Scripts, kind: jobs.JobKind = "chat") -> str:
    job_id = queued(scripts, kind)
    assert claim(scripts, job_id) is not None
    return job_id


def reap(scripts: Scripts, queue_timeout: float = QUEUE_TIMEOUT) -> int:
    return int(scripts.run(jobs.reap(ttl=TTL, queue_timeout=queue_timeout)))


def record(db: redis.Redis, job_id: str) -> jobs.JobRecord:
    return jobs.JobRecord.from_hash(db.hgetall(keys.job(job_id)))  # type: ignore[arg-type]


def ended(db: redis.Redis) -> list[jobs.Ended]:
    return [jobs.Ended.model_validate(fields) for _, fields in db.xrange(keys.ENDED)]  # type: ignore[union-attr]


def job_log(db: redis.Redis, job_id: str) -> list[events.AnyEvent]:
    return [events.decode(i, x) for i, x in enumerate(db.lrange(keys.job_log(job_id), 0, -1))]  # type: ignore[union-attr]


def redis_now(db: redis.Redis) -> float:
    seconds, micros = db.time()
    return seconds + micros / 1_000_000


def start_batch(db: redis.Redis, batch_id: str, expires_at: float, status: str = "in_progress") -> None:
    """The fields of a batch record the job scripts read (tasks/batches.py writes the rest)."""
    db.hset(keys.batch(batch_id), mapping={"status": status, "expires_at": str(expires_at)})


# --- admission ----------------------------------------------------------------------------------


def test_admission_records_spec_meta_and_kind_apart_at_redis_time(db: redis.Redis, scripts: Scripts) -> None:
    job = new_job("response")
    before = redis_now(db)
    created_at = admit(scripts, job)
    after = redis_now(db)
    assert created_at is not None and before <= created_at <= after
    stored = db.hgetall(keys.job(job.spec.id))
    assert stored["kind"] == "response" and stored["status"] == "queued"
    assert "owner" not in stored["spec"] and "metadata" not in stored["spec"]  # the worker's part only
    rec = record(db, job.spec.id)
    assert (rec.spec, rec.meta, rec.created_at) == (job.spec, job.meta, created_at)
    assert db.zscore(keys.QUEUED, job.spec.id) == pytest.approx(created_at, abs=1e-6)


def test_admission_stops_at_max_queued_and_batch_lines_do_not_count(
    db: redis.Redis, scripts: Scripts
) -> None:
    first, second, third = new_job(), new_job(), new_job()
    assert admit(scripts, first, max_queued=2) is not None
    assert admit(scripts, second, max_queued=2) is not None
    assert admit(scripts, third, max_queued=2) is None
    assert not db.exists(keys.job(third.spec.id))  # a refused job leaves nothing behind
    line = new_job(batch="batch_1")
    assert scripts.run(jobs.admit_batch_line(line, ttl=TTL)) == 1  # outside MAX_QUEUED
    assert db.zcard(keys.QUEUED) == 2 and db.zcard(keys.BATCH_QUEUED) == 1
    # A cancelled job stops counting at once.
    assert scripts.run(jobs.cancel(first.spec.id, ttl=TTL)) == "queued"
    assert admit(scripts, third, max_queued=2) is not None


def test_a_batch_line_is_recorded_once(db: redis.Redis, scripts: Scripts) -> None:
    line = new_job(batch="batch_1")
    assert scripts.run(jobs.admit_batch_line(line, ttl=TTL)) == 1
    assert scripts.run(jobs.admit_batch_line(line, ttl=TTL)) == 0  # an API restart enqueues it again
    assert db.hget(keys.job(line.spec.id), "batch") == "batch_1"


def test_an_admission_run_again_after_a_lost_reply_changes_nothing(db: redis.Redis, scripts: Scripts) -> None:
    """Under Sentinel a call is retried after a lost reply; a second ADMIT of the same job must
    answer as the first and not put a job a worker claimed meanwhile back to queued."""
    job = new_job()
    first = admit(scripts, job, max_queued=1)
    assert first is not None
    assert claim(scripts, job.spec.id) is not None
    assert admit(scripts, job, max_queued=1) == first  # not refused as over MAX_QUEUED either
    rec = record(db, job.spec.id)
    assert (rec.status, rec.worker) == ("in_progress", "w1")
    assert not db.zscore(keys.QUEUED, job.spec.id)


# --- claims -------------------------------------------------------------------------------------


def test_a_job_is_claimed_once(db: redis.Redis, scripts: Scripts) -> None:
    job = new_job()
    assert admit(scripts, job) is not None
    got = claim(scripts, job.spec.id)
    assert got is not None and got.spec == job.spec and 0 <= got.waited_seconds < 60
    assert claim(scripts, job.spec.id) is None  # a redelivered message
    rec = record(db, job.spec.id)
    assert (rec.status, rec.worker) == ("in_progress", "w1")
    assert rec.started_at is not None and rec.started_at >= rec.created_at
    assert db.get(keys.job_lease(job.spec.id)) == "w1"
    assert db.sismember(keys.RUNNING, job.spec.id) and not db.zscore(keys.QUEUED, job.spec.id)
    assert ended(db) == []


def test_a_claim_after_cancel_is_refused(db: redis.Redis, scripts: Scripts) -> None:
    job_id = queued(scripts)
    assert scripts.run(jobs.cancel(job_id, ttl=TTL)) == "queued"
    assert claim(scripts, job_id) is None
    assert record(db, job_id).status == "cancelled"
    assert [(e.id, e.status) for e in ended(db)] == [(job_id, "cancelled")]


def test_a_claim_past_the_queue_deadline_fails_the_job(db: redis.Redis, scripts: Scripts) -> None:
    job_id = queued(scripts)
    assert claim(scripts, job_id, queue_timeout=PAST) is None
    rec = record(db, job_id)
    assert (rec.status, rec.error_code) == ("failed", "queue_timeout")
    assert job_log(db, job_id) == [jobs.QUEUE_TIMEOUT.model_copy(update={"seq": 0})]
    assert not db.zscore(keys.QUEUED, job_id) and not db.sismember(keys.RUNNING, job_id)
    assert [(e.id, e.status) for e in ended(db)] == [(job_id, "failed")]


def test_a_batch_line_has_no_queue_deadline_but_its_batch_window(db: redis.Redis, scripts: Scripts) -> None:
    now = redis_now(db)
    start_batch(db, "batch_open", expires_at=now + 3600)
    start_batch(db, "batch_closed", expires_at=now - 1)  # closed a second ago, by Redis's clock
    open_line, late_line = new_job(batch="batch_open"), new_job(batch="batch_closed")
    for line in (open_line, late_line):
        assert scripts.run(jobs.admit_batch_line(line, ttl=TTL)) == 1
    assert claim(scripts, open_line.spec.id, queue_timeout=PAST) is not None
    assert claim(scripts, late_line.spec.id) is None
    assert record(db, late_line.spec.id).status == "cancelled"
    assert db.sismember(keys.BATCH_RUNNING, open_line.spec.id)
    assert [(e.id, e.status, e.batch) for e in ended(db)] == [
        (late_line.spec.id, "cancelled", "batch_closed")
    ]


@pytest.mark.parametrize("status", ["cancelling", "cancelled", "failed"])
def test_a_line_of_a_batch_that_is_winding_down_never_starts(
    db: redis.Redis, scripts: Scripts, status: str
) -> None:
    start_batch(db, "batch_1", expires_at=redis_now(db) + 3600, status=status)
    line = new_job(batch="batch_1")
    assert scripts.run(jobs.admit_batch_line(line, ttl=TTL)) == 1
    assert claim(scripts, line.spec.id) is None
    assert record(db, line.spec.id).status == "cancelled"


# --- endings: exactly one, recorded once --------------------------------------------------------


def _finish(scripts: Scripts, job_id: str) -> None:
    assert scripts.run(jobs.append(job_id, FINISHED, ttl=TTL)) >= 0


def _fail(db: redis.Redis, scripts: Scripts, job_id: str) -> None:
    assert scripts.run(jobs.append(job_id, FAILED, ttl=TTL)) >= 0


def _cancel_queued(db: redis.Redis, scripts: Scripts, job_id: str) -> None:
    assert scripts.run(jobs.cancel(job_id, ttl=TTL)) == "queued"


def _lose_worker(db: redis.Redis, scripts: Scripts, job_id: str) -> None:
    db.delete(keys.job_lease(job_id))  # what the lease's expiry does when its worker dies
    assert reap(scripts) == 1


def _reap_past_deadline(db: redis.Redis, scripts: Scripts, job_id: str) -> None:
    assert reap(scripts, queue_timeout=PAST) == 1


def _claim_past_deadline(db: redis.Redis, scripts: Scripts, job_id: str) -> None:
    assert claim(scripts, job_id, queue_timeout=PAST) is None


# name: (claimed first?, how it ends, status, error code)
ENDINGS: dict[str, tuple[bool, Callable[[redis.Redis, Scripts, str], None], str, str | None]] = {
    "finished": (True, lambda db, s, j: _finish(s, j), "completed", None),
    "failed": (True, _fail, "failed", "internal_error"),
    "cancelled while queued": (False, _cancel_queued, "cancelled", None),
    "worker lost": (True, _lose_worker, "failed", "worker_lost"),
    "queue deadline, reaped": (False, _reap_past_deadline, "failed", "queue_timeout"),
    "queue deadline, at claim": (False, _claim_past_deadline, "failed", "queue_timeout"),
}


@pytest.mark.parametrize("name", ENDINGS)
def test_a_job_ends_once_and_the_ended_stream_records_it_once(
    db: redis.Redis, scripts: Scripts, name: str
) -> None:
    start_running, end, status, code = ENDINGS[name]
    job_id = running(scripts, "response") if start_running else queued(scripts, "response")
    end(db, scripts, job_id)
    rec = record(db, job_id)
    assert (rec.status, rec.error_code) == (status, code)
    # Every later ending is a no-op: the record, the log and the stream stay as they are.
    assert scripts.run(jobs.append(job_id, FAILED, ttl=TTL)) == -1
    assert scripts.run(jobs.append(job_id, FINISHED, ttl=TTL)) == -1
    scripts.run(jobs.cancel(job_id, ttl=TTL))
    db.delete(keys.job_lease(job_id))
    reap(scripts, queue_timeout=PAST)
    assert record(db, job_id) == rec
    log = job_log(db, job_id)
    assert [events.is_terminal(e) for e in log] == [False] * (len(log) - 1) + [True]
    (entry,) = ended(db)
    assert entry == jobs.Ended(id=job_id, kind="response", status=status, at=rec.finished_at)  # type: ignore[arg-type]
    assert rec.finished_at is not None and rec.created_at <= rec.finished_at <= redis_now(db)
    assert not db.sismember(keys.RUNNING, job_id) and not db.zscore(keys.QUEUED, job_id)
    assert not db.exists(keys.job_lease(job_id))


def test_an_ended_batch_line_names_its_batch_and_reaches_its_done_list(
    db: redis.Redis, scripts: Scripts
) -> None:
    start_batch(db, "batch_1", expires_at=redis_now(db) + 3600)
    line = new_job(batch="batch_1")
    assert scripts.run(jobs.admit_batch_line(line, ttl=TTL)) == 1
    assert claim(scripts, line.spec.id) is not None
    _finish(scripts, line.spec.id)
    assert [(e.id, e.kind, e.status, e.batch) for e in ended(db)] == [
        (line.spec.id, "chat", "completed", "batch_1")
    ]
    assert db.lrange(keys.batch_part("batch_1", "done"), 0, -1) == [line.spec.id]
    assert not db.sismember(keys.BATCH_RUNNING, line.spec.id)


def test_the_ended_stream_stays_bounded(db: redis.Redis, scripts: Scripts) -> None:
    pipe = db.pipeline(transaction=False)
    for i in range(jobs.ENDED_MAXLEN + 1000):
        pipe.xadd(keys.ENDED, {"id": f"old{i}"})
    pipe.execute()
    _finish(scripts, running(scripts))
    # MAXLEN ~ trims whole macro nodes (100 entries by default), so up to a node more stays.
    assert jobs.ENDED_MAXLEN <= db.xlen(keys.ENDED) <= jobs.ENDED_MAXLEN + 100


# --- cancel and reaping -------------------------------------------------------------------------


def test_cancel_flags_a_running_job_for_its_worker(db: redis.Redis, scripts: Scripts) -> None:
    job_id = running(scripts)
    assert scripts.run(jobs.cancel(job_id, ttl=TTL)) == "in_progress"
    assert db.exists(keys.job_cancel(job_id)) and record(db, job_id).status == "in_progress"
    assert ended(db) == []  # the worker ends it, between tokens
    assert scripts.run(jobs.append(job_id, jobs.cancelled_event(3, 1), ttl=TTL)) >= 0
    assert record(db, job_id).status == "cancelled"
    assert scripts.run(jobs.cancel("chatcmpl-unknown", ttl=TTL)) is None


def test_reap_ends_only_jobs_whose_lease_lapsed(db: redis.Redis, scripts: Scripts) -> None:
    alive, lost = running(scripts), running(scripts)
    waiting = queued(scripts)
    assert reap(scripts) == 0
    db.delete(keys.job_lease(lost))  # what the lease's expiry does when its worker dies
    assert reap(scripts) == 1
    assert (record(db, lost).status, record(db, lost).error_code) == ("failed", "worker_lost")
    assert job_log(db, lost)[-1] == jobs.WORKER_LOST.model_copy(update={"seq": 0})
    assert record(db, alive).status == "in_progress" and record(db, waiting).status == "queued"
    assert reap(scripts) == 0


def test_reap_ends_queued_jobs_past_their_deadline_by_redis_time(db: redis.Redis, scripts: Scripts) -> None:
    waiting = queued(scripts)
    start_batch(db, "batch_1", expires_at=redis_now(db) + 3600)
    line = new_job(batch="batch_1")
    assert scripts.run(jobs.admit_batch_line(line, ttl=TTL)) == 1
    assert reap(scripts) == 0  # an hour's deadline has not passed
    assert reap(scripts, queue_timeout=PAST) == 1  # a deadline a second ago has
    assert (record(db, waiting).status, record(db, waiting).error_code) == ("failed", "queue_timeout")
    assert record(db, line.spec.id).status == "queued"  # batch lines have no queue deadline


# --- pipelines ----------------------------------------------------------------------------------


def _calls(db: redis.Redis, name: str) -> int:
    """How many times redis-server ran the command `name` since the stats were reset."""
    stats = db.info("commandstats")
    return int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))  # type: ignore[union-attr]


def test_a_pipeline_of_appends_keeps_order_sends_no_script_exists_and_survives_a_flush(
    db: redis.Redis, scripts: Scripts
) -> None:
    job_id = running(scripts)
    deltas = [events.Delta(text=f"t{i}") for i in range(6)]
    db.config_resetstat()
    first = scripts.run_many([jobs.append(job_id, d, ttl=TTL) for d in deltas[:3]])
    db.script_flush()  # as after a restart or a failover: every script must load again
    second = scripts.run_many([jobs.append(job_id, d, ttl=TTL) for d in deltas[3:]])
    third = scripts.run_many([jobs.append(job_id, FINISHED, ttl=TTL)])
    assert [*first, *second, *third] == list(range(7))  # each event's seq, none lost or repeated
    assert job_log(db, job_id) == [e.model_copy(update={"seq": i}) for i, e in enumerate([*deltas, FINISHED])]
    assert _calls(db, "script|exists") == 0


# --- A failover's retries, WAIT, an empty script cache (tasks/scripts.py) ----------------------


def claim_call(job_id: str) -> jobs.ScriptCall:
    return jobs.claim(job_id, ttl=TTL, worker="w1", lease_seconds=LEASE, queue_timeout=QUEUE_TIMEOUT)


def log_texts(db: redis.Redis, job_id: str) -> list[str | None]:
    stored = db.lrange(keys.job_log(job_id), 0, -1)
    return [getattr(events.decode(i, p), "text", None) for i, p in enumerate(stored)]


def test_an_event_retried_after_a_lost_reply_is_appended_once(scripts: Scripts, db: redis.Redis) -> None:
    job_id = running(scripts)
    delta = jobs.append(job_id, events.Delta(text="the"), ttl=TTL)
    first = scripts.run(delta)
    assert first >= 0
    assert scripts.run(delta) == -1  # the same call again, as redis-py's retry sends it
    again = jobs.append(job_id, events.Delta(text="the"), ttl=TTL)  # a new write of equal text
    assert scripts.run(again) == first + 1
    assert scripts.run_many([delta, again]) == [-1, -1]  # a pipeline retried whole
    end = jobs.append(job_id, FINISHED, ttl=TTL)
    assert scripts.run(end) >= 0 and scripts.run(end) == -1
    assert log_texts(db, job_id).count("the") == 2


def test_durable_writes_wait_for_replicas_and_go_on_without_them(server: str, db: redis.Redis) -> None:
    client = redis.Redis.from_url(server, decode_responses=True, socket_timeout=10)
    waiting = Scripts(client, Wait(replicas=1, timeout_ms=50))  # this Redis has none: WAIT times out
    job = new_job()
    call = jobs.admit(job, ttl=TTL, max_queued=100, queue_timeout=QUEUE_TIMEOUT)
    assert isinstance(jobs.admitted(waiting.run(call)), float)
    assert jobs.claimed(waiting.run(claim_call(job.spec.id))) is not None
    delta = jobs.append(job.spec.id, events.Delta(text="x"), ttl=TTL)
    assert waiting.run_many([delta, jobs.append(job.spec.id, FINISHED, ttl=TTL)])[1] >= 0
    assert db.hget(keys.job(job.spec.id), "status") == "completed"
    assert int(db.info("commandstats")["cmdstat_wait"]["calls"]) == 3  # admit, claim, end: not the delta
    assert durable(claim_call(job.spec.id)) and durable(jobs.append(job.spec.id, FINISHED, ttl=TTL))
    assert not durable(delta)
    client.close()


def test_a_failed_wait_is_logged_and_the_write_stands(
    server: str, db: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """WAIT refused (here by an ACL without it) after the scripts ran: the caller gets the
    scripts' answer, as the write stands, and the failure is logged."""
    db.acl_setuser("nowait", enabled=True, passwords=["+pw"], keys=["llmq:*"], commands=["+@all", "-wait"])
    parts = urlsplit(server)
    client = redis.Redis.from_url(f"redis://nowait:pw@{parts.hostname}:{parts.port}/0", decode_responses=True)
    try:
        job = new_job()
        call = jobs.admit(job, ttl=TTL, max_queued=100, queue_timeout=QUEUE_TIMEOUT)
        assert isinstance(jobs.admitted(Scripts(client, Wait(replicas=1, timeout_ms=50)).run(call)), float)
        assert db.hget(keys.job(job.spec.id), "status") == "queued"
        assert "WAIT failed" in caplog.text
    finally:
        client.close()
        db.acl_deluser("nowait")
        db.acl_log_reset()  # the refusal this test made on purpose, not one the service met


def test_scripts_are_loaded_again_after_the_cache_is_emptied(scripts: Scripts, db: redis.Redis) -> None:
    """As on a replica promoted by a failover: NOSCRIPT, then loaded, and the calls run in order."""
    job_id = queued(scripts)
    db.script_flush()
    assert jobs.claimed(scripts.run(claim_call(job_id))) is not None
    db.script_flush()
    base = db.llen(keys.job_log(job_id))
    deltas = [jobs.append(job_id, events.Delta(text=t), ttl=TTL) for t in "abc"]
    assert scripts.run_many(deltas) == [base, base + 1, base + 2]
    assert log_texts(db, job_id)[base:] == ["a", "b", "c"]
