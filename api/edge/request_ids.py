"""`x-request-id` on every response, as OpenAI sends it (the SDKs expose it as `_request_id`).

It is the job's id when the request created or names a job (chatcmpl-..., resp_...), otherwise a
fresh `req_...`. It is also the id in brackets on every log line written for the request
(tasks/logs.py's job-id field), so the id in a user's bug report finds the request in the logs.
"""

from __future__ import annotations

import secrets

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tasks import logs

HEADER = "x-request-id"


def new_request_id() -> str:
    return f"req_{secrets.token_hex(16)}"


def current() -> str:
    """The request id: the job id once a handler has set one (logs.job_id_var)."""
    return logs.job_id_var.get() or new_request_id()


class RequestId:
    """Plain ASGI: it runs in the request's own task, so the job id a handler sets in the
    context variable is the one read when the response head goes out (BaseHTTPMiddleware would
    run the handler in another task and never see it)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Each request runs in a task of its own (a copy of the server's context): no reset needed,
        # and errors answered after this returns (on_unexpected) still see the id.
        logs.job_id_var.set(new_request_id())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[HEADER] = current()
            await send(message)

        await self.app(scope, receive, send_with_id)
