"""The fair shares' pure parts: API_KEY_WEIGHTS parsing (refused at start-up, naming no key)
and the prompt estimate the fair index charges at claim."""

from __future__ import annotations

import pytest

from tasks import jobs
from tasks.settings import Settings


def test_weights_parse_to_a_key_map_and_a_key_may_hold_equals_signs() -> None:
    settings = Settings(api_key_weights=" key-a=2, key-b = 0.5 ,abc==3,")
    assert settings.api_key_weight_map == {"key-a": 2.0, "key-b": 0.5, "abc=": 3.0}
    assert Settings().api_key_weight_map == {}


@pytest.mark.parametrize(
    "value", ["secret-key", "secret-key=0", "secret-key=-1", "secret-key=x", "=2", "k=inf"]
)
def test_a_malformed_weight_is_refused_without_naming_the_key(value: str) -> None:
    settings = Settings(api_key_weights=value)  # read as text; the API parses it at start-up
    with pytest.raises(ValueError) as refused:
        _ = settings.api_key_weight_map
    assert "secret-key" not in str(refused.value)


def test_the_prompt_estimate_is_characters_over_four_rounded_up() -> None:
    messages = [jobs.Message(role="system", content="x" * 5), jobs.Message(role="user", content="y" * 4)]
    spec = jobs.JobSpec(id="chatcmpl-x", kind="chat", model="m", messages=messages, sampling=jobs.Sampling())
    assert jobs.estimated_prompt_tokens(spec) == 3
