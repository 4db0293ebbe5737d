"""Metrics after real requests, and logs that follow a job from the API to the worker."""

from __future__ import annotations

import json
import time

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import Stack
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


def test_metrics_count_real_requests_with_vllm_names(
    stack: Stack, client: openai.OpenAI, model_name: str
) -> None:
    before = scrape(stack)
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
    time.sleep(0.2)
    after = scrape(stack)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("vllm:prompt_tokens_total", model_name=model_name) == done.usage.prompt_tokens
    assert delta("vllm:generation_tokens_total", model_name=model_name) == 3
    assert delta("vllm:request_success_total", finished_reason="length") == 1
    assert delta("llmq_request_failures_total", code="context_length_exceeded") == 1
    for hist in (
        "time_to_first_token_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
        "time_per_output_token_seconds",
    ):
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
    time.sleep(0.5)
    api_lines = [line for line in stack.api.log_path.read_text().splitlines() if done.id in line]
    worker_lines = [line for line in stack.worker.log_path.read_text().splitlines() if done.id in line]
    assert any("job queued" in line for line in api_lines), api_lines
    assert any("generating" in line for line in worker_lines), worker_lines


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
