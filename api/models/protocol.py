"""OpenAI wire models for /v1/models."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class Serving(BaseModel):
    """This service's extension of a model card, fenced under `llmq`: how the model is served
    now. OpenAI's SDK keeps unknown fields, so `card.llmq` reads it (a dict) unchanged."""

    workers: int
    slots: int
    engine: str | None = None
    context_length: int | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llmq"
    llmq: Serving | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
