"""The body-size middleware: 413 in OpenAI's error shape before an oversized body is read."""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import errors

# Room for a multipart upload's boundaries and part headers around the file itself.
MULTIPART_OVERHEAD_BYTES = 64 * 1024


class BodySizeLimit:
    """413 for a request body over `max_bytes`: declared by Content-Length, or counted as it arrives.

    Plain ASGI, not BaseHTTPMiddleware: wrapping `receive` lets a chunked body (no Content-Length)
    be cut off as soon as it passes the limit, before the app has read and buffered the rest.
    Not FastAPI's own `max_body_size`: Starlette answers some of those 413s itself in plain text
    (a body the route never reads), not in OpenAI's error shape, and it looks at Content-Length
    only once the app reads the body; here an oversized declared body never reaches the app.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, uploads: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.uploads = uploads or {}  # path -> its own limit (file uploads: MAX_FILE_BYTES)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = self.uploads.get(scope["path"], self.max_bytes)
        declared = _content_length(scope)
        if declared is not None and declared > max_bytes:
            await self._reject(scope, receive, send, max_bytes)
            return

        received = 0
        started = False
        answered = False

        async def counting_receive() -> Message:
            nonlocal received, answered
            if answered:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    if not started:
                        await self._reject(scope, receive, send, max_bytes)
                        answered = True
                    # To the app the client has gone; its reaction (an error) is never sent.
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if answered:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counting_receive, guarded_send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send, max_bytes: int) -> None:
        error = errors.RequestTooLarge(f"The request body is larger than {max_bytes} bytes.")
        await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the HTTP server rejects it; counting still guards the body
    return None
