"""The batch input check (api/batches/lines.py): which problems fail the whole file, and which
lines the endpoint refuses, with the endpoint's own status and error body."""

from __future__ import annotations

import json
from typing import Any

import pytest

from api.batches import lines as batch_lines
from tasks.registry import Models, ServedModel
from tasks.settings import Settings

SETTINGS = Settings(max_tokens_limit=100)
WORKER = {"name": "w1", "model": "m", "slots": 1}
MODELS = Models(known={"m": ServedModel("m", created=0, last_seen=0.0, workers=(WORKER,))}, workers=(WORKER,))
CHAT = "/v1/chat/completions"


def line(custom_id: str, url: str = CHAT, **body: Any) -> str:
    request = {"messages": [{"role": "user", "content": "Hi"}], **body}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": request})


def parse(*lines: str, endpoint: str = CHAT) -> batch_lines.ParsedInput:
    return batch_lines.parse_input(
        ("\n".join(lines) + "\n").encode(), endpoint, SETTINGS, MODELS, owner="tag"
    )


def test_valid_lines_become_jobs_in_order_with_the_owner() -> None:
    parsed = parse(line("a"), "", line("b", max_tokens=5, temperature=0))
    assert not parsed.errors and not parsed.refused
    assert [x.custom_id for x in parsed.lines] == ["a", "b"]
    job = parsed.lines[1].job
    assert job is not None and job.spec.kind == "chat"
    assert job.meta.owner == "tag" and job.spec.sampling.max_tokens == 5


def test_problems_that_fail_the_file_name_every_line() -> None:
    parsed = parse(line("a"), "{not json", line("a"), line("c", url="/v1/responses"), line("d", stream=True))
    assert [(e.code, e.line) for e in parsed.errors] == [
        ("invalid_json_line", 2),
        ("duplicate_custom_id", 3),
        ("mismatched_url", 4),
        ("stream_unsupported", 5),
    ]


def test_at_most_a_hundred_problems_are_listed() -> None:
    parsed = parse(*["[]"] * 500)
    assert len(parsed.errors) == batch_lines.MAX_REPORTED_ERRORS


@pytest.mark.parametrize(
    ("extra", "status", "code", "param"),
    [
        ({"temperature": 9}, 400, "invalid_value", "temperature"),
        ({"max_tokens": 101}, 400, "max_tokens_too_large", "max_tokens"),
        ({"model": "gpt-5"}, 404, "model_not_found", "model"),
        ({"functions": [{"name": "f"}]}, 400, "unsupported_parameter", "functions"),
        ({"seed": 2**63}, 400, "invalid_value", "seed"),
    ],
)
def test_a_line_the_endpoint_refuses_gets_its_error_in_the_error_file(
    extra: dict[str, Any], status: int, code: str, param: str
) -> None:
    parsed = parse(line("ok"), line("bad", **extra))
    assert not parsed.errors and [x.job is None for x in parsed.lines] == [False, True]
    refused = json.loads(parsed.refused[1])
    assert refused["custom_id"] == "bad" and refused["error"] is None
    assert refused["response"]["status_code"] == status
    error = refused["response"]["body"]["error"]
    assert (error["code"], error["param"]) == (code, param)


def test_a_body_field_is_named_as_the_endpoint_names_it() -> None:
    raw = line("s").replace('"Hi"', '"\\ud800"')  # a lone surrogate: valid JSON, refused
    error = json.loads(parse(raw).refused[0])["response"]["body"]["error"]
    assert error["param"] == "messages[0].content" and "'messages[0].content'" in error["message"]


def test_a_responses_line_never_runs_in_the_background() -> None:
    raw = json.dumps(
        {
            "custom_id": "r",
            "method": "POST",
            "url": "/v1/responses",
            "body": {"input": "x", "background": True},
        }
    )
    (parsed,) = parse(raw, endpoint="/v1/responses").lines
    assert parsed.job is not None and parsed.job.meta.response is not None
    assert parsed.job.spec.kind == "response" and parsed.job.meta.response.background is False


def test_an_empty_file_fails() -> None:
    assert [e.code for e in parse("", "  ").errors] == ["empty_file"]
    assert batch_lines.count_lines(b"\n a \n\n b\n") == 2


def test_lines_that_cannot_be_carried_fail_the_file_instead_of_the_service() -> None:
    deep = '{"custom_id": "a", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    surrogate_id = json.dumps({"custom_id": "\ud800", "method": "POST", "url": CHAT, "body": {}})
    huge = '{"custom_id": "h", "n": ' + "9" * 5000 + "}"
    parsed = parse(deep, surrogate_id, huge, line("ok"))
    assert [(e.code, e.line) for e in parsed.errors] == [
        ("invalid_json_line", 1),
        ("invalid_custom_id", 2),
        ("invalid_json_line", 3),
    ]
