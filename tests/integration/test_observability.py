"""Metrics after real requests, and logs that follow a job from the API to the worker."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import Stack
from tests.integration.helpers import wait_for
from tests.processes import start_api


def scrape(stack: Stack) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = httpx.get(f"{stack.api_url}/metrics", timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(r.text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


HISTOGRAMS = (
    "time_to_first_token_seconds",
    "e2e_request_latency_seconds",
    "request_queue_time_seconds",
    "time_per_output_token_seconds",
)
# What this test counts: (name, labels) and how much one blocking request of 3 tokens plus one
# refused prompt add (prompt tokens are filled in by the test).
COUNTED: list[tuple[str, dict[str, str]]] = [
    ("vllm:prompt_tokens_total", {}),
    ("vllm:generation_tokens_total", {}),
    ("vllm:request_success_total", {"finished_reason": "length"}),
    ("llmq_request_failures_total", {"code": "context_length_exceeded"}),
    *((f"vllm:{h}_count", {}) for h in HISTOGRAMS),
]
# Workers add their counts to the metrics every 2 s: counts that hold still for longer have all
# landed, so earlier tests' jobs cannot add to this test's deltas.
FLUSH_SECONDS = 2.5


def counted(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> list[float]:
    return [value(samples, name, **labels) for name, labels in COUNTED]


def settled(stack: Stack) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A scrape once the stack is idle and its counts have stopped moving (bounded)."""

    def still() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        first = scrape(stack)
        time.sleep(FLUSH_SECONDS)
        second = scrape(stack)
        idle = value(second, "vllm:num_requests_running") == value(second, "vllm:num_requests_waiting") == 0
        return second if idle and counted(first) == counted(second) else None

    return wait_for(still, 30, "the metrics to settle")


def test_metrics_count_real_requests_with_vllm_names(
    stack: Stack, client: openai.OpenAI, model_name: str
) -> None:
    before = settled(stack)
    done = client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert done.usage is not None
    too_long = httpx.post(
        f"{stack.api_url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "слово " * 9000}]},
        timeout=60,
    )
    assert too_long.status_code == 400
    want = [done.usage.prompt_tokens, 3, 1, 1, *(1 for _ in HISTOGRAMS)]
    # Wait until every count has reached what these two requests add, then for the rest to land.
    wait_for(
        lambda: all(
            b + w <= a for a, b, w in zip(counted(scrape(stack)), counted(before), want, strict=True)
        ),
        30,
        "the two requests to be counted",
    )
    after = settled(stack)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("vllm:prompt_tokens_total", model_name=model_name) == done.usage.prompt_tokens
    assert delta("vllm:generation_tokens_total", model_name=model_name) == 3
    assert delta("vllm:request_success_total", finished_reason="length") == 1
    assert delta("llmq_request_failures_total", code="context_length_exceeded") == 1
    for hist in HISTOGRAMS:
        assert delta(f"vllm:{hist}_count") == 1, hist
        assert value(after, f"vllm:{hist}_bucket", le="+Inf") == value(after, f"vllm:{hist}_count")
    assert value(after, "vllm:num_requests_waiting") == 0
    assert value(after, "vllm:num_requests_running") == 0
    assert value(after, "llmq_workers_alive") == 1
    assert value(after, "llmq_worker_info", device="cpu", model_name=model_name) == 1


def test_logs_carry_the_job_id_from_api_to_worker(
    stack: Stack, client: openai.OpenAI, model_name: str
) -> None:
    done = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )

    def lines(log: Path) -> list[str]:
        return [line for line in log.read_text().splitlines() if done.id in line]

    # Log files are written as they go; waited for, bounded, not slept on.
    wait_for(lambda: any("job queued" in x for x in lines(stack.api.log_path)), 10, "the API's log line")
    wait_for(
        lambda: any("generating" in x for x in lines(stack.worker.log_path)), 10, "the worker's log line"
    )


def test_json_logs(stack: Stack, client: openai.OpenAI, model_name: str) -> None:
    api, url = start_api({**stack.env, "LOG_FORMAT": "json"}, stack.log_dir, name="api-json")
    try:
        second = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        done = second.chat.completions.create(
            model=model_name, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
        )
    finally:
        api.stop()
    records = [json.loads(line) for line in api.log_path.read_text().splitlines() if line.startswith("{")]
    mine = [r for r in records if r.get("job_id") == done.id]
    assert any(r["message"].startswith("job queued") and r["level"] == "INFO" for r in mine), records[-5:]
    assert all({"time", "level", "name", "message"} <= r.keys() for r in records)
