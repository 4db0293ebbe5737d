"""GET /v1/models: every model with a ready worker, as the workers' heartbeats announce them
(tasks/registry.py); no model is configured on the API."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import ModelsDep
from api.models.protocol import ModelCard, ModelList, Serving
from api.serving.routing import model_for
from tasks.registry import ServedModel

router = APIRouter()


def _card(model: ServedModel) -> ModelCard:
    # describe() is the serving state /health shows too; the card keeps Serving's fields of it.
    return ModelCard(id=model.id, created=model.created, llmq=Serving.model_validate(model.describe()))


@router.get("/v1/models")
async def list_models(models: ModelsDep) -> ModelList:
    ready = sorted((await models.models()).ready, key=lambda m: m.id)
    return ModelList(data=[_card(m) for m in ready])


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, models: ModelsDep) -> ModelCard:
    """The model's card; 404 if never announced, 503 while it has no worker (as a request)."""
    current = await models.models()
    return _card(current.known[model_for(current, model_id)])
