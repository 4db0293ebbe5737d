"""/v1/batches: create, list, retrieve and cancel batches."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from api.batches.protocol import Batch, BatchCreateRequest
from api.batches.serving import BatchesService
from api.deps import BatchesDep, CallerDep, FilesDep, SettingsDep
from api.edge.body import StrictJSONRoute
from api.files.protocol import Page
from api.files.serving import FilesService

router = APIRouter(route_class=StrictJSONRoute)


def service(batches: BatchesDep, files: FilesDep, settings: SettingsDep, owner: CallerDep) -> BatchesService:
    return BatchesService(batches, FilesService(files, settings, owner), settings, owner)


ServiceDep = Annotated[BatchesService, Depends(service)]


@router.post("/v1/batches")
async def create_batch(request: BatchCreateRequest, svc: ServiceDep) -> Batch:
    return await svc.create(request)


@router.get("/v1/batches")
async def list_batches(
    svc: ServiceDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(max_length=64)] = None,
) -> Page[Batch]:
    return await svc.page(limit, after)


@router.get("/v1/batches/{batch_id}")
async def retrieve_batch(batch_id: str, svc: ServiceDep) -> Batch:
    return await svc.get(batch_id)


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, svc: ServiceDep) -> Batch:
    return await svc.cancel(batch_id)
