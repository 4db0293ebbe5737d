"""Which model a request goes to: the registry's answer (tasks/registry.py) in the API's error
shape. Every endpoint that creates work asks here, so "which model, is it up" has one answer."""

from __future__ import annotations

from api import errors
from tasks import registry
from tasks.registry import ModelRegistry, Models


def model_for(models: Models, requested: str | None, can_wait: bool = False) -> str:
    """The served model's name for a request's `model` (None: omitted), or the API error;
    `can_wait`: see Models.resolve."""
    try:
        return models.resolve(requested, can_wait)
    except registry.ModelNotGiven as exc:
        raise errors.InvalidRequest(str(exc), param="model", code="missing_required_parameter") from None
    except registry.UnknownModel as exc:
        raise errors.ModelNotFound(str(exc), param="model") from None
    except registry.ModelUnavailable as exc:
        raise errors.ModelUnavailable(str(exc), retry_after=exc.retry_after) from None


async def route(models: ModelRegistry, requested: str | None) -> str:
    """model_for against the registry's current reading."""
    return model_for(await models.models(), requested)
