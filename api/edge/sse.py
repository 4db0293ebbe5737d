"""Server-Sent Events framing."""

from __future__ import annotations

DONE = "data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
MEDIA_TYPE = "text/event-stream"


def data(payload: str) -> str:
    return f"data: {payload}\n\n"


def comment(text: str) -> str:
    """A line that SSE clients ignore; keeps idle connections alive through proxies."""
    return f": {text}\n\n"
