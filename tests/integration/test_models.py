"""Two models behind one API (issue 20): the embedded SmolLM2 on llama.cpp, and a tiny Llama-3
(the real tokenizer) scripted to write one sentence, on transformers under its own served name.
Each worker consumes its own model's queue, the API learns both from their heartbeats, and every
request, blocking, streamed, background or a batch line, is answered by a worker of its model;
an omitted, unknown or worker-less model gets its own error; one model's workers going away and
coming back leaves the other serving and its own queued work waiting, then done."""

from __future__ import annotations

import io
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tasks import keys
from tests.integration.conftest import Stack, running_stack
from tests.integration.helpers import TERMINAL, rdb, sdk, wait_batch, wait_for, wait_response
from tests.processes import Service, start_worker
from tests.tiny_llama import TinyLlamas

SMOL = "SmolLM2-135M-Instruct"
SCRIPTED = "scripted-llama3"
SCRIPT = "The second model answers."
HI = [{"role": "user", "content": "Hi"}]


def scripted_env(stack_env: dict[str, str], model_dir: Path, cache: Path) -> dict[str, str]:
    return {
        **stack_env,
        "MODEL_ID": str(model_dir),
        "SERVED_MODEL_NAME": SCRIPTED,
        "ENGINE": "transformers",
        "DTYPE": "float32",
        "MODEL_CACHE_DIR": str(cache),
    }


@pytest.fixture(scope="module")
def two(
    tmp_path_factory: pytest.TempPathFactory, tiny_llamas: TinyLlamas, model_cache: Path
) -> Iterator[tuple[Stack, dict[str, str]]]:
    """The default stack (SmolLM2 worker, API) and a second worker of the scripted model."""
    model_dir, _ = tiny_llamas.scripted(SCRIPT)
    log_dir = tmp_path_factory.mktemp("two-models")
    # A short lease and stop timeout keep the restart test quick; nothing here runs long.
    with running_stack(log_dir, JOB_LEASE_SECONDS="6") as stack:
        env = scripted_env(stack.env, model_dir, model_cache)
        second = start_worker(env, log_dir, name="scripted-worker")
        try:
            second.wait_until(lambda: SCRIPTED in ready_models(stack), timeout=300)
            stack.second = second  # type: ignore[attr-defined]
            yield stack, env
        finally:
            stack.second.stop()  # type: ignore[attr-defined]


def ready_models(stack: Stack) -> dict[str, list[str]]:
    """Model -> its ready workers' names, as /health lists them."""
    r = httpx.get(f"{stack.api_url}/health", timeout=5)
    if r.status_code != 200:
        return {}
    return {name: m["workers"] for name, m in r.json()["models"].items() if m["ready"]}


def model_of_worker(stack: Stack) -> dict[str, str]:
    r = httpx.get(f"{stack.api_url}/health", timeout=5)
    return {w["name"]: w["model"] for w in r.json()["workers"]}


def answered_by(stack: Stack, job_id: str) -> str:
    """The model of the worker that ran the job, from its record."""
    worker = rdb(stack).hget(keys.job(job_id), "worker")
    assert worker, f"job {job_id} has no worker"
    return model_of_worker(stack)[str(worker)]


def test_models_lists_both_with_their_serving_state(two: tuple[Stack, dict[str, str]]) -> None:
    stack, _ = two
    client = sdk(stack)
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {SMOL, SCRIPTED}
    assert cards[SMOL].llmq["engine"] == "llama.cpp"  # type: ignore[attr-defined]
    assert cards[SCRIPTED].llmq["engine"] == "transformers"  # type: ignore[attr-defined]
    assert client.models.retrieve(SCRIPTED).llmq["workers"] == 1  # type: ignore[attr-defined]
    health = httpx.get(f"{stack.api_url}/health", timeout=5).json()
    assert set(health["models"]) == {SMOL, SCRIPTED} and len(health["workers"]) == 2


@pytest.mark.parametrize("model", [SMOL, SCRIPTED])
def test_each_request_is_answered_by_a_worker_of_its_model(
    two: tuple[Stack, dict[str, str]], model: str
) -> None:
    stack, _ = two
    client = sdk(stack)
    blocking = client.chat.completions.create(model=model, messages=HI, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    assert blocking.model == model and answered_by(stack, blocking.id) == model
    chunks = list(
        client.chat.completions.create(model=model, messages=HI, max_tokens=12, temperature=0, stream=True)  # type: ignore[arg-type]
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert {c.model for c in chunks} == {model} and answered_by(stack, chunks[0].id) == model
    background = client.responses.create(model=model, input="Hi", max_output_tokens=12, background=True)
    done = wait_response(client, background.id, TERMINAL)
    assert done.status == "completed" or done.status == "incomplete"
    assert done.model == model and answered_by(stack, background.id) == model
    if model == SCRIPTED:  # the scripted model writes its sentence, whatever it is asked
        assert blocking.choices[0].message.content == streamed == SCRIPT[: len(streamed)]
        assert done.output_text == SCRIPT[: len(done.output_text)]


def test_omitted_unknown_and_each_error_in_the_openai_shape(two: tuple[Stack, dict[str, str]]) -> None:
    stack, _ = two
    client = sdk(stack)
    r = httpx.post(f"{stack.api_url}/v1/chat/completions", json={"messages": HI}, timeout=10)
    error = r.json()["error"]
    assert (r.status_code, error["param"], error["code"]) == (400, "model", "missing_required_parameter")
    assert SMOL in error["message"] and SCRIPTED in error["message"]
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-5", messages=HI)  # type: ignore[arg-type]
    assert missing.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-5")


def test_a_batch_routes_each_line_by_its_model(two: tuple[Stack, dict[str, str]]) -> None:
    stack, _ = two
    client = sdk(stack)
    lines = [
        {"custom_id": "smol", "body": {"model": SMOL, "messages": HI, "max_tokens": 6, "temperature": 0}},
        {"custom_id": "scripted", "body": {"model": SCRIPTED, "messages": HI, "max_tokens": 6}},
        {"custom_id": "unknown", "body": {"model": "gpt-5", "messages": HI}},
    ]
    content = "".join(
        json.dumps({**line, "method": "POST", "url": "/v1/chat/completions"}) + "\n" for line in lines
    )
    file = client.files.create(file=("in.jsonl", io.BytesIO(content.encode())), purpose="batch")
    batch = client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait_batch(client, batch.id, {"completed", "failed", "expired", "cancelled"}, timeout=180)
    assert done.status == "completed"
    assert (done.request_counts.completed, done.request_counts.failed) == (2, 1)  # type: ignore[union-attr]
    assert done.output_file_id and done.error_file_id
    outputs = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    bodies = {o["custom_id"]: o["response"]["body"] for o in outputs}
    assert bodies["smol"]["model"] == SMOL and bodies["scripted"]["model"] == SCRIPTED
    assert answered_by(stack, bodies["scripted"]["id"]) == SCRIPTED
    assert (
        bodies["scripted"]["choices"][0]["message"]["content"]
        == SCRIPT[: len(bodies["scripted"]["choices"][0]["message"]["content"])]
    )
    (refused,) = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]
    assert refused["custom_id"] == "unknown"
    assert refused["response"]["body"]["error"]["code"] == "model_not_found"


def test_a_model_whose_workers_left_is_503_its_queued_work_waits_and_the_other_serves(
    two: tuple[Stack, dict[str, str]], tmp_path: Path
) -> None:
    stack, env = two
    client = sdk(stack)
    second: Service = stack.second  # type: ignore[attr-defined]
    second.stop(signal.SIGKILL)  # no goodbye: its heartbeat has to run out
    wait_for(lambda: SCRIPTED not in ready_models(stack), timeout=40, what="the killed worker to lapse")
    # Known but without workers: 503 with Retry-After, for a request and for its card.
    r = httpx.post(
        f"{stack.api_url}/v1/chat/completions", json={"model": SCRIPTED, "messages": HI}, timeout=10
    )
    assert (r.status_code, r.json()["error"]["code"]) == (503, "model_unavailable")
    assert int(r.headers["Retry-After"]) > 0
    assert httpx.get(f"{stack.api_url}/v1/models/{SCRIPTED}", timeout=5).status_code == 503
    assert [m.id for m in client.models.list().data] == [SMOL]
    # With one model ready, an omitted model goes to it; the other keeps serving throughout.
    alone = client.chat.completions.create(messages=HI, max_tokens=4, model=None)  # type: ignore[arg-type,call-overload]
    assert alone.model == SMOL
    # Work for the absent model queued before it left (a batch line may wait) runs when it is back.
    line = {
        "custom_id": "waits",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": SCRIPTED, "messages": HI, "max_tokens": 6},
    }
    file = client.files.create(
        file=("w.jsonl", io.BytesIO((json.dumps(line) + "\n").encode())), purpose="batch"
    )
    batch = client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    wait_batch(client, batch.id, {"in_progress"}, timeout=30)
    time.sleep(2)
    assert client.batches.retrieve(batch.id).request_counts.completed == 0  # type: ignore[union-attr]
    stack.second = start_worker(env, stack.log_dir, name="scripted-worker-again")  # type: ignore[attr-defined]
    stack.second.wait_until(lambda: SCRIPTED in ready_models(stack), timeout=300)  # type: ignore[attr-defined]
    done = wait_batch(client, batch.id, {"completed", "failed", "expired", "cancelled"}, timeout=120)
    assert (done.status, done.request_counts.completed) == ("completed", 1)  # type: ignore[union-attr]
    again = client.chat.completions.create(model=SCRIPTED, messages=HI, max_tokens=6)
    assert again.model == SCRIPTED and answered_by(stack, again.id) == SCRIPTED
