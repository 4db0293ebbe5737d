"""POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from api import sse
from api.body import StrictJSONRoute
from api.chat import ChatRun
from api.deps import JobsDep, SettingsDep
from api.protocol import ChatCompletion, ChatCompletionRequest

router = APIRouter(route_class=StrictJSONRoute)


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(
    request: ChatCompletionRequest, http_request: Request, jobs: JobsDep, settings: SettingsDep
) -> ChatCompletion | StreamingResponse:
    ChatRun.validate(request, settings)
    run = ChatRun(request, jobs, settings, is_disconnected=http_request.is_disconnected)
    await run.start()
    if not request.stream:
        return await run.complete()
    return StreamingResponse(run.stream(), media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)
