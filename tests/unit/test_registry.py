"""Which model a request goes to (tasks/registry.py Models.resolve), from one reading of the
workers' heartbeats: omitted, named, never announced, known but without workers; and the API's
error for each (api/serving/routing.py)."""

from __future__ import annotations

from typing import Any

import pytest

from api import errors
from api.serving.routing import model_for
from tasks.registry import Models, ServedModel


def worker(name: str, model: str, slots: int = 1) -> dict[str, Any]:
    return {"name": name, "model": model, "slots": slots, "engine": "llama.cpp", "context_length": 8192}


def reading(ready: dict[str, int], gone: tuple[str, ...] = ()) -> Models:
    """`ready`: model -> its workers' count; `gone`: models known with no worker now."""
    known = {
        name: ServedModel(name, 1, 2.0, tuple(worker(f"{name}-w{i}", name, 4) for i in range(count)))
        for name, count in ready.items()
    }
    known |= {name: ServedModel(name, 1, 2.0) for name in gone}
    return Models(known=known, workers=tuple(w for m in known.values() for w in m.workers))


def test_omitted_goes_to_the_only_ready_model_even_beside_one_that_is_gone() -> None:
    assert reading({"small": 1}, gone=("big",)).resolve(None) == "small"


def test_omitted_with_several_ready_is_400_naming_model_and_listing_them() -> None:
    with pytest.raises(errors.InvalidRequest) as refused:
        model_for(reading({"small": 1, "big": 2}), None)
    assert (refused.value.status, refused.value.param) == (400, "model")
    assert "big, small" in refused.value.message


def test_a_named_ready_model_is_routed_whatever_else_is_served() -> None:
    models = reading({"small": 1, "big": 2}, gone=("old",))
    assert model_for(models, "big") == "big"
    assert models.known["big"].describe() == {
        "ready": True,
        "workers": 2,
        "slots": 8,
        "engine": "llama.cpp",
        "context_length": 8192,
    }


def test_never_announced_is_404_model_not_found() -> None:
    with pytest.raises(errors.ModelNotFound) as missing:
        model_for(reading({"small": 1}), "gpt-5")
    assert (missing.value.status, missing.value.code, missing.value.param) == (
        404,
        "model_not_found",
        "model",
    )


def test_known_without_workers_is_503_model_unavailable_with_retry_after() -> None:
    with pytest.raises(errors.ModelUnavailable) as down:
        model_for(reading({"small": 1}, gone=("big",)), "big")
    assert (down.value.status, down.value.code) == (503, "model_unavailable")
    assert down.value.headers() == {"Retry-After": "5"}


def test_nothing_ready_is_503_even_when_the_model_is_omitted() -> None:
    with pytest.raises(errors.ModelUnavailable):
        model_for(reading({}, gone=("big",)), None)
    with pytest.raises(errors.ModelUnavailable):
        model_for(Models(), None)


def test_a_batch_line_may_wait_for_a_known_model_but_not_an_unknown_one() -> None:
    models = reading({"small": 1}, gone=("big",))
    assert model_for(models, "big", can_wait=True) == "big"
    with pytest.raises(errors.ModelNotFound):
        model_for(models, "gpt-5", can_wait=True)
    # Omitted: the only known model, even with no worker now; with two known, name one.
    assert model_for(reading({}, gone=("big",)), None, can_wait=True) == "big"
    with pytest.raises(errors.InvalidRequest):
        model_for(models, None, can_wait=True)
