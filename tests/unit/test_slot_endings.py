"""How a job with n choices ends (tasks/slots.py `_terminal`): one terminal event for all its
choices, interrupted if any choice was, whatever choice 0 did first."""

from __future__ import annotations

from model.types import Completion
from tasks import events
from tasks.slots import _terminal


def ended(*reasons: str) -> dict[int, Completion]:
    return {i: Completion(r, 10, 3) for i, r in enumerate(reasons)}  # type: ignore[arg-type]


def test_one_choice_ends_as_it_did() -> None:
    done = _terminal(ended("length"), None)
    assert isinstance(done, events.Finished)
    assert (done.finish_reason, done.choices, done.prompt_tokens, done.completion_tokens) == (
        "length",
        [],
        10,
        3,
    )


def test_choices_count_their_tokens_together_and_keep_each_reason() -> None:
    done = _terminal(ended("stop", "length", "stop"), None)
    assert isinstance(done, events.Finished)
    assert (done.finish_reason, done.choices, done.completion_tokens) == (
        "stop",
        ["stop", "length", "stop"],
        9,
    )
    assert [done.reason_of(i) for i in range(3)] == ["stop", "length", "stop"]


def test_a_cancel_after_choice_0_finished_still_cancels_the_job() -> None:
    done = _terminal(ended("stop", "cancelled"), "cancelled")
    assert isinstance(done, events.Finished) and done.finish_reason == "cancelled"


def test_a_time_limit_after_choice_0_finished_makes_the_job_incomplete() -> None:
    done = _terminal(ended("stop", "cancelled"), "time_limit")
    assert isinstance(done, events.Finished)
    assert done.finish_reason == "time_limit" and done.choices == ["stop", "time_limit"]


def test_a_shutdown_fails_the_job() -> None:
    done = _terminal(ended("stop", "cancelled"), "shutdown")
    assert isinstance(done, events.Failed) and done.code == "worker_shutdown"
