"""GET /: the chat page, one self-contained HTML file (api/static/chat.html), read once."""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from tasks.sampling import Sampling

router = APIRouter()

# The page loads nothing from elsewhere; the policy makes that a rule the browser enforces.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'"
)


# The settings the page starts from: the service's own defaults, so the page has no copy of them.
PAGE_DEFAULTS = ("temperature", "top_p", "max_tokens")


@lru_cache(maxsize=1)
def chat_page() -> str:
    page = (files("api") / "static" / "chat.html").read_text(encoding="utf-8")
    defaults = Sampling()
    for name in PAGE_DEFAULTS:
        page = page.replace("{{" + name + "}}", str(getattr(defaults, name)))
    return page


@router.get("/", include_in_schema=False)
async def page() -> HTMLResponse:
    # Open like /health: the page holds no data; the /v1 calls it makes carry the API key.
    return HTMLResponse(
        chat_page(), headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache"}
    )
