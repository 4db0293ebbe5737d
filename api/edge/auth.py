"""API keys: who is calling, from `Authorization: Bearer <key>`, checked in constant time."""

from __future__ import annotations

import hashlib
import hmac
from functools import lru_cache
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api import errors
from tasks.settings import Settings, get_settings

# auto_error=False: a missing or malformed header gets our 401 in OpenAI's shape, not FastAPI's.
# HTTPBearer also declares the scheme in /openapi.json, so /docs offers an "Authorize" button.
_bearer = HTTPBearer(auto_error=False, description="One of the keys in API_KEYS")

OWNER_TAG_CHARS = 32


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@lru_cache(maxsize=8)
def _key_digests(keys: tuple[str, ...]) -> tuple[bytes, ...]:
    return tuple(_digest(k) for k in keys)


def owner_tag(key: str) -> str:
    """The identity a key's jobs are stored under: a hash prefix, never the key itself."""
    return _digest(key).hex()[:OWNER_TAG_CHARS]


def caller(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    settings: Annotated[Settings, Depends(get_settings)],
) -> str | None:
    """The caller's owner tag; None when API_KEYS is empty (auth off). Raises InvalidAPIKey."""
    keys = settings.api_key_list
    if not keys:
        return None
    if credentials is None or not credentials.credentials.strip():
        raise errors.InvalidAPIKey("Missing API key: send the header 'Authorization: Bearer <key>'.")
    presented = _digest(credentials.credentials.strip())
    # Digests have one length, and every key is compared with no early exit, so the time taken
    # tells nothing about which key matched, how close a guess was, or how long the keys are.
    matched = False
    for digest in _key_digests(tuple(keys)):
        matched |= hmac.compare_digest(presented, digest)
    if not matched:
        raise errors.InvalidAPIKey("Invalid API key.")  # never echoes what was sent
    return presented.hex()[:OWNER_TAG_CHARS]
