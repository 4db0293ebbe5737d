"""Fuzz the API from its own OpenAPI schema (schemathesis): no 5xx, responses match the schema,
and every error is in OpenAI's shape. Runs against the real stack with a tiny token cap, so
every accepted request is a short real generation."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests import needs

schemathesis = needs.module("schemathesis", "pip install -e '.[dev]'")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import response_schema_conformance  # noqa: E402

from tests.integration.conftest import Stack, running_stack  # noqa: E402

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(
        tmp_path_factory.mktemp("fuzz"), MAX_TOKENS_LIMIT="4", MAX_MESSAGES="4", REQUEST_TIMEOUT_SECONDS="60"
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def api_schema(fuzzed: Stack) -> Any:
    return schemathesis.openapi.from_url(f"{fuzzed.api_url}/openapi.json")


def test_no_server_errors_and_one_error_shape(api_schema: Any) -> None:
    # Driven by hand rather than by schemathesis' pytest plugin, which this pytest outgrew.
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/responses"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: Any) -> None:
            response = case.call(timeout=120)
            case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])
            content_type = " ".join(response.headers.get("content-type", []))
            if response.status_code >= 400 and content_type.startswith("application/json"):
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"}
                assert "Traceback" not in error["message"]

        check()
