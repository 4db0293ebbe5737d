"""Markers by place: every test under tests/integration is `integration` (a conftest's
`pytestmark` marks nothing, so the path decides), and the costliest are `slow`.

`-m "not integration"` runs the unit tests alone; `-m "not slow"` is the quick loop.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_llama import TinyLlamas

INTEGRATION = Path(__file__).parent / "integration"

# The costliest tests of a full run (`make test` prints --durations=25), each 10 s or more on a
# two-core machine: their own stacks and models, worker kills and restarts, hundreds of requests.
# A module path marks all its tests; a node id, that test (every parametrization of it).
SLOW = (
    "tests/integration/test_browser.py",
    "tests/integration/test_batches.py::test_a_worker_killed_and_an_api_restarted_mid_batch_lose_no_line",
    "tests/integration/test_batches.py::test_a_redis_restart_with_the_shipped_config_loses_no_finished_line",
    "tests/integration/test_batches.py::test_a_batch_past_its_window_expires_with_its_finished_lines",
    "tests/integration/test_chat_completions.py::test_seed_blocking_example_answers_in_russian",
    "tests/integration/test_faults.py::test_a_thousand_requests_with_aborts_leak_nothing",
    "tests/integration/test_faults.py::test_sigkill_mid_stream_fails_the_job_in_band_and_it_never_reruns",
    "tests/integration/test_faults.py::test_sigkill_keeps_partial_text_for_pollers",
    "tests/integration/test_faults.py::test_generation_time_limit_ends_with_what_it_has",
    "tests/integration/test_faults.py::test_generation_longer_than_visibility_timeout_runs_once",
    "tests/integration/test_faults.py::test_sigterm_mid_generation_fails_the_job_within_the_grace_period",
    "tests/integration/test_faults.py::test_restarted_worker_takes_queued_jobs_once_ready",
    "tests/integration/test_ops.py::test_worker_healthcheck_passes_only_for_its_own_host",
    "tests/integration/test_slots.py::test_cancelling_one_of_four_leaves_the_others_as_they_would_have_been",
    "tests/integration/test_slots.py::test_kill_9_with_four_running_loses_all_four_once_and_none_reruns",
    "tests/integration/test_slots.py::test_sigterm_with_four_running_ends_each_with_its_text",
    "tests/integration/test_structured.py::test_a_hundred_sampled_generations_all_follow_their_schema",
    "tests/integration/test_tools.py::test_auto_answers_with_text_or_a_valid_call",
)


def _slow(item: pytest.Item) -> bool:
    if item.nodeid.startswith(SLOW):
        return True
    # The llama.cpp engine fixtures load 128k-vocabulary GGUFs (and convert their tokenizer once).
    params = getattr(getattr(item, "callspec", None), "params", {})
    return params.get("backend") == "llama.cpp"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION in item.path.parents:
            item.add_marker(pytest.mark.integration)
        if _slow(item):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One MODEL_CACHE_DIR for the session, unit engines and test workers alike: a GGUF's
    tokenizer is converted once (tens of seconds for Llama-3's 128k vocabulary), as a worker's
    cache does across restarts."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def tiny_llamas(tmp_path_factory: pytest.TempPathFactory) -> TinyLlamas:
    """Every test model of the session, each built once (tests/tiny_llama.py)."""
    return TinyLlamas(tmp_path_factory.mktemp("tiny-llamas"))
