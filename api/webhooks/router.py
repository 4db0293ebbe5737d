"""GET /v1/webhooks/deliveries: the last deliveries and their attempts, for an operator
debugging a receiver. Not an OpenAI route (theirs is a dashboard): fenced behind the admin key."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from api import errors
from api.deps import SettingsDep, WebhooksDep
from api.webhooks.endpoints import endpoints
from tasks.webhooks import RECENT_DELIVERIES, Delivery

router = APIRouter()
_bearer = HTTPBearer(auto_error=False, scheme_name="AdminKey", description="ADMIN_API_KEY")


class ListedDelivery(Delivery):
    url: str | None  # None: its endpoint is no longer registered on this instance


class DeliveryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ListedDelivery]


def admin(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)], settings: SettingsDep
) -> None:
    """ADMIN_API_KEY when set; without it the route is open only where every route is (no
    API_KEYS), since deliveries name every key's responses and batches and the receivers' URLs."""
    if not settings.admin_api_key:
        if settings.api_key_list:
            raise errors.NotFound("Listing webhook deliveries needs ADMIN_API_KEY to be set.")
        return
    presented = credentials.credentials.strip() if credentials else ""
    digest = hashlib.sha256(presented.encode()).digest()
    if not hmac.compare_digest(digest, hashlib.sha256(settings.admin_api_key.encode()).digest()):
        raise errors.InvalidAPIKey("This route needs the admin key (ADMIN_API_KEY).")


@router.get("/v1/webhooks/deliveries", dependencies=[Depends(admin)])
async def list_deliveries(
    store: WebhooksDep, settings: SettingsDep, limit: Annotated[int, Query(ge=1, le=RECENT_DELIVERIES)] = 20
) -> DeliveryList:
    """Newest first: each delivery's event, endpoint, state and its last attempts (when, the
    status answered or the error, how long it took). Bodies are not listed: the event is named
    by its id, type and subject."""
    urls = {e.id: e.url for e in endpoints(settings)}
    listed = [ListedDelivery(**d.model_dump(), url=urls.get(d.endpoint)) for d in await store.recent(limit)]
    return DeliveryList(data=listed)
