"""Caps every endpoint applies: how many messages, how large a token budget."""

from __future__ import annotations

from api import errors
from tasks.sampling import DEFAULT_MAX_TOKENS
from tasks.settings import Settings


def check_messages(settings: Settings, param: str, count: int) -> None:
    if count > settings.max_messages:
        raise errors.TooManyMessages(
            f"'{param}' has {count} messages; at most {settings.max_messages} are allowed.", param=param
        )


def check_max_tokens(settings: Settings, **requested: int | None) -> None:
    """Each named token budget (max_tokens=..., max_output_tokens=...) within MAX_TOKENS_LIMIT."""
    for param, value in requested.items():
        if value is not None and value > settings.max_tokens_limit:
            raise errors.MaxTokensTooLarge(
                f"'{param}' is {value}; at most {settings.max_tokens_limit} is allowed.", param=param
            )


def default_max_tokens(settings: Settings) -> int:
    """A request's budget when it names none: the service's default, or MAX_TOKENS_LIMIT if lower."""
    return min(DEFAULT_MAX_TOKENS, settings.max_tokens_limit)
