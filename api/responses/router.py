"""/v1/responses: create (blocking, streamed or background), retrieve or resume, cancel, delete, and
list a stored response's input items."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from api.deps import CallerDep, JobsDep, LimitsDep, ModelsDep, SettingsDep
from api.edge import sse
from api.edge.body import StrictJSONRoute
from api.responses.protocol import DeletedResponse, Response, ResponseCreateRequest, ResponseItemList
from api.responses.serving import ResponsesService
from api.serving.following import ClientWatch

router = APIRouter(route_class=StrictJSONRoute)


def service(
    jobs: JobsDep, models: ModelsDep, settings: SettingsDep, owner: CallerDep, limits: LimitsDep
) -> ResponsesService:
    return ResponsesService(jobs, models, settings, owner, limits)


ServiceDep = Annotated[ResponsesService, Depends(service)]


def _sse_response(stream: object) -> StreamingResponse:
    return StreamingResponse(stream, media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)  # type: ignore[arg-type]


@router.post("/v1/responses", response_model=None)
async def create_response(
    request: ResponseCreateRequest, http_request: Request, svc: ServiceDep
) -> Response | StreamingResponse:
    model = await svc.validate(request)
    if request.stream:
        return _sse_response(await svc.create_stream(request, model))
    if request.background:
        return await svc.create_background(request, model)
    with ClientWatch(http_request.receive) as watch:
        return await svc.create_blocking(request, model, watch.gone)


@router.get("/v1/responses/{response_id}", response_model=None)
async def retrieve_response(
    response_id: str,
    svc: ServiceDep,
    stream: bool = False,
    # Bounded so that starting_after + 1 is still a Redis list index (a signed 64-bit integer).
    starting_after: Annotated[int, Query(ge=-1, le=2**62)] = -1,
) -> Response | StreamingResponse:
    if stream:
        return _sse_response(await svc.resume(response_id, starting_after))
    return await svc.retrieve(response_id)


@router.post("/v1/responses/{response_id}/cancel")
async def cancel_response(response_id: str, svc: ServiceDep) -> Response:
    return await svc.cancel(response_id)


@router.get("/v1/responses/{response_id}/input_items")
async def list_input_items(
    response_id: str,
    svc: ServiceDep,
    after: Annotated[str | None, Query(max_length=100)] = None,
    before: Annotated[str | None, Query(max_length=100)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
) -> ResponseItemList:
    # OpenAI's `include` adds fields of built-in tools' items, which never occur here: ignored.
    return await svc.input_items(response_id, limit=limit, order=order, after=after, before=before)


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, svc: ServiceDep) -> DeletedResponse:
    return await svc.delete(response_id)
