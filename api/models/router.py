"""GET /v1/models."""

from __future__ import annotations

import time

from fastapi import APIRouter

from api.deps import SettingsDep
from api.models.protocol import ModelCard, ModelList

router = APIRouter()
_STARTED = int(time.time())


@router.get("/v1/models")
async def list_models(settings: SettingsDep) -> ModelList:
    return ModelList(data=[ModelCard(id=settings.model_name, created=_STARTED)])


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, settings: SettingsDep) -> ModelCard:
    from api.errors import ModelNotFound

    if model_id != settings.model_name:
        raise ModelNotFound(f"The model '{model_id}' does not exist.", param="model")
    return ModelCard(id=settings.model_name, created=_STARTED)
