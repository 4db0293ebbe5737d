"""The one source of sampling defaults and ranges (tasks/sampling.py): what each endpoint's request
becomes with `to_sampling()`, the 400 each range gives (naming the wire field), and what the
worker hands the engine."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from api import errors
from api.chat_completion.protocol import ChatCompletionRequest
from api.ops.page import chat_page
from api.responses.protocol import ResponseCreateRequest
from tasks.sampling import DEFAULT_MAX_TOKENS, Sampling

MESSAGES = [{"role": "user", "content": "Привет"}]


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": MESSAGES, **fields})


def test_the_defaults_are_the_documented_ones() -> None:
    # README, "Chat completions": the Default column.
    assert Sampling().model_dump() == {
        "max_tokens": 512,
        "temperature": 0.6,
        "top_p": 0.9,
        "seed": None,
        "stop": [],
        "grammar": None,
        "n": 1,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "logit_bias": {},
        "logprobs": False,
        "top_logprobs": 0,
        "ignore_eos": False,
        "top_k": -1,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
    }


@pytest.mark.parametrize("nulls", [False, True], ids=["absent", "null"])
def test_a_request_that_sets_nothing_samples_with_the_defaults(nulls: bool) -> None:
    names = ("temperature", "top_p", "n", "seed", "top_k", "min_p", "logprobs", "ignore_eos")
    request = chat(**dict.fromkeys(names)) if nulls else chat()
    assert request.to_sampling(DEFAULT_MAX_TOKENS) == Sampling()
    assert request.to_sampling(100).max_tokens == 100  # MAX_TOKENS_LIMIT below the default
    responses = ResponseCreateRequest.model_validate(
        {"input": "Привет", "temperature": None} if nulls else {"input": "x"}
    )
    assert responses.to_sampling(DEFAULT_MAX_TOKENS) == Sampling()


def test_a_chat_request_passes_every_parameter_it_sets() -> None:
    request = chat(
        max_tokens=5,
        max_completion_tokens=7,
        temperature=0,
        top_p=0.5,
        stop="конец",
        seed=-3,
        n=2,
        presence_penalty=1.5,
        frequency_penalty=-1,
        logit_bias={"42": -100, "7": 2.5},
        logprobs=True,
        top_logprobs=3,
        ignore_eos=True,
        top_k=40,
        min_p=0.05,
        repetition_penalty=1.2,
        response_format={"type": "json_object"},
    )
    sampling = request.to_sampling(DEFAULT_MAX_TOKENS)
    assert sampling.model_dump(exclude={"grammar"}) == {
        "max_tokens": 7,  # max_completion_tokens wins
        "temperature": 0.0,
        "top_p": 0.5,
        "seed": -3,
        "stop": ["конец"],
        "n": 2,
        "presence_penalty": 1.5,
        "frequency_penalty": -1.0,
        "logit_bias": {42: -100.0, 7: 2.5},
        "logprobs": True,
        "top_logprobs": 3,
        "ignore_eos": True,
        "top_k": 40,
        "min_p": 0.05,
        "repetition_penalty": 1.2,
    }
    assert sampling.grammar is not None and sampling.grammar == request.grammar()
    params = sampling.to_params()
    assert (params.max_tokens, params.stop, params.logit_bias, params.top_k) == (
        7,
        ("конец",),
        ((7, 2.5), (42, -100.0)),
        40,
    )


def test_a_responses_request_passes_what_it_has() -> None:
    request = ResponseCreateRequest.model_validate(
        {
            "input": "x",
            "max_output_tokens": 9,
            "temperature": 1.5,
            "top_p": 0.3,
            "ignore_eos": True,
            "include": ["message.output_text.logprobs"],
            "top_logprobs": 4,
        }
    )
    assert request.to_sampling(DEFAULT_MAX_TOKENS) == Sampling(
        max_tokens=9, temperature=1.5, top_p=0.3, ignore_eos=True, logprobs=True, top_logprobs=4
    )


def test_the_engine_reads_all_as_top_k_zero() -> None:
    assert Sampling(top_k=-1).to_params().top_k == 0 and Sampling(top_k=0).to_params().top_k == 0


OUT_OF_RANGE = [
    ("temperature", 2.01),
    ("temperature", -0.1),
    ("top_p", 0),
    ("top_p", 1.01),
    ("max_tokens", 0),
    ("max_completion_tokens", 0),
    ("n", 0),
    ("seed", 2**63),
    ("presence_penalty", 2.5),
    ("frequency_penalty", -2.01),
    ("top_logprobs", 21),
    ("top_k", -2),
    ("min_p", 1.01),
    ("repetition_penalty", 0),
    ("repetition_penalty", 10.5),
    ("logit_bias", {"5": 100.5}),
    ("logit_bias", {str(i): 1 for i in range(301)}),
    ("stop", ["a", "b", "c", "d", "e"]),
]


def refusal(model: type[Any], body: dict[str, Any]) -> errors.InvalidRequest:
    with pytest.raises(ValidationError) as exc:
        model.model_validate(body)
    return errors.validation_error(exc.value.errors())


@pytest.mark.parametrize(("param", "value"), OUT_OF_RANGE)
def test_a_chat_value_out_of_range_is_a_400_naming_it(param: str, value: Any) -> None:
    error = refusal(ChatCompletionRequest, {"messages": MESSAGES, param: value})
    assert (error.status, error.param, error.code) == (400, param, "invalid_value")
    # ...and what the request allows, the job record allows: the ranges are the same ones.
    within = {"temperature": 2, "top_p": 1, "n": 1, "seed": 2**63 - 1, "top_k": -1, "min_p": 1}
    if param in within:
        sampling = chat(**{param: within[param]}).to_sampling(DEFAULT_MAX_TOKENS)
        assert getattr(sampling, param) == within[param]


@pytest.mark.parametrize(
    ("param", "value"),
    [("temperature", 2.5), ("top_p", 0), ("max_output_tokens", 0), ("top_logprobs", -1)],
)
def test_a_responses_value_out_of_range_is_a_400_naming_it(param: str, value: Any) -> None:
    error = refusal(ResponseCreateRequest, {"input": "x", param: value})
    assert (error.status, error.param, error.code) == (400, param, "invalid_value")


def test_the_chat_page_starts_from_the_service_defaults() -> None:
    page = chat_page()
    defaults = Sampling()
    assert f'id="temperature" type="number" step="any" min="0" max="2" value="{defaults.temperature}"' in page
    assert f'id="top-p" type="number" step="any" min="0" max="1" value="{defaults.top_p}"' in page
    assert f'id="max-tokens" type="number" step="1" min="1" value="{defaults.max_tokens}"' in page
    assert "{{" not in page
