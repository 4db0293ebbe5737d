"""POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from api.chat_completion.protocol import ChatCompletion, ChatCompletionRequest
from api.chat_completion.serving import ChatRun, validate
from api.deps import CallerDep, JobsDep, ModelsDep, SettingsDep
from api.edge import sse
from api.edge.body import StrictJSONRoute
from api.serving.following import ClientWatch
from api.serving.routing import route

router = APIRouter(route_class=StrictJSONRoute)


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(
    request: ChatCompletionRequest,
    http_request: Request,
    jobs: JobsDep,
    models: ModelsDep,
    settings: SettingsDep,
    owner: CallerDep,
) -> ChatCompletion | StreamingResponse:
    validate(request, settings)
    model = await route(models, request.model)
    if request.stream:
        # Once streaming, Starlette's StreamingResponse notices a hang-up and stops the stream.
        run = ChatRun(request, model, jobs, settings, owner=owner)
        await run.start()
        return StreamingResponse(run.stream(), media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)
    with ClientWatch(http_request.receive) as watch:
        run = ChatRun(request, model, jobs, settings, gone=watch.gone, owner=owner)
        await run.start()
        return await run.complete()
