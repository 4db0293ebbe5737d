"""Markers by place: every test under tests/integration is `integration` (a conftest's
`pytestmark` marks nothing, so the path decides), and the costliest are `slow`.

`-m "not integration"` runs the unit tests alone; `-m "not slow"` is the quick loop.
"""

from __future__ import annotations

from pathlib import Path

import pytest

INTEGRATION = Path(__file__).parent / "integration"

# What costs the most in a full run (`make test` prints --durations=25): a stack of its own per
# module, worker restarts, a thousand requests, llama.cpp loading 128k-token GGUFs. Each entry is a
# test module (all its tests) or a node id prefix.
SLOW = (
    "tests/integration/test_batches.py",
    "tests/integration/test_browser.py",
    "tests/integration/test_faults.py",
    "tests/integration/test_fuzz.py",
    "tests/integration/test_hostile.py",
    "tests/integration/test_slots.py",
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
