"""The registered endpoints, which events each receives, the event bodies and their signatures
(Standard Webhooks, as the openai SDK's `client.webhooks.unwrap` verifies them)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass

from pydantic import ValidationError

from api.edge.auth import owner_tag
from tasks.batches import BatchSpec
from tasks.jobs import JobMeta
from tasks.settings import Settings, WebhookEventType, webhook_key
from tasks.webhooks import Ending

log = logging.getLogger(__name__)

# The job statuses a background response ends with, and the batch statuses a batch ends with,
# are the suffixes of OpenAI's event types.
_RESPONSE_ENDINGS = frozenset({"completed", "incomplete", "failed", "cancelled"})
_BATCH_ENDINGS = frozenset({"completed", "failed", "expired", "cancelled"})


@dataclass(frozen=True)
class Endpoint:
    """A registered receiver, as the runner uses it: the key its events are signed with and the
    owner tags (api.edge.auth.owner_tag) whose events it gets, never the API keys themselves."""

    id: str  # from the URL: the same on every API instance given the same settings
    url: str
    key: bytes
    events: frozenset[str] | None  # None: every type
    owners: frozenset[str | None] | None  # None: every key's (and the keyless caller's)

    def wants(self, event_type: str, owner: str | None) -> bool:
        return (self.events is None or event_type in self.events) and (
            self.owners is None or owner in self.owners
        )


def endpoint_id(url: str) -> str:
    return "we_" + hashlib.sha256(url.encode()).hexdigest()[:16]


def endpoints(settings: Settings) -> list[Endpoint]:
    """Every endpoint the settings register (checked when they were read: http(s) URLs,
    usable secrets). Raises ValueError if two register the same URL: a delivery is per URL."""
    out: list[Endpoint] = []
    for e in settings.webhook_endpoint_list:
        owners = None if e.api_keys is None else frozenset(owner_tag(k) for k in e.api_keys)
        events = None if e.events is None else frozenset(e.events)
        out.append(Endpoint(endpoint_id(e.url), e.url, webhook_key(e.secret), events, owners))
    if len({e.id for e in out}) < len(out):
        raise ValueError("each webhook endpoint needs its own URL (WEBHOOK_URL, WEBHOOK_ENDPOINTS)")
    return out


@dataclass(frozen=True)
class Event:
    """One event, whoever receives it: its id is the same for every endpoint and every attempt."""

    id: str
    type: WebhookEventType
    subject: str  # resp_... or batch_...
    created_at: float  # when it ended, Redis's clock
    owner: str | None

    def body(self) -> str:
        """OpenAI's event shape; `data` names the object, which the receiver fetches."""
        event = {
            "id": self.id,
            "object": "event",
            "created_at": int(self.created_at),
            "type": self.type,
            "data": {"id": self.subject},
        }
        return json.dumps(event, separators=(",", ":"))


def event_id(entry_id: str, subject: str) -> str:
    """From the ended stream's entry: the same event however often its entry is read."""
    return "evt_" + hashlib.sha256(f"{entry_id}:{subject}".encode()).hexdigest()[:32]


def job_event(entry_id: str, ending: Ending, meta_json: str | None) -> Event | None:
    """A background response's ending as an event; None for any other job (chat completions,
    blocking or streamed responses, batch lines: their caller was there to see the end)."""
    if (
        ending.kind != "response"
        or ending.batch
        or meta_json is None
        or ending.status not in _RESPONSE_ENDINGS
    ):
        return None
    try:
        meta = JobMeta.model_validate_json(meta_json)
    except ValidationError:  # passed over, logged: one bad record must not stop every event after it
        log.exception("response %s: its record could not be read; no webhook event", ending.id)
        return None
    if meta.response is None or not meta.response.background:
        return None
    kind: WebhookEventType = f"response.{ending.status}"  # type: ignore[assignment]
    return Event(event_id(entry_id, ending.id), kind, ending.id, ending.at, meta.owner)


def batch_event(entry_id: str, ending: Ending, spec_json: str | None) -> Event | None:
    """A batch's ending as an event, owned as its spec says (None: its record is gone, which
    leaves it to endpoints for every key)."""
    if ending.status not in _BATCH_ENDINGS:
        return None
    try:
        owner = BatchSpec.model_validate_json(spec_json).owner if spec_json else None
    except ValidationError:
        log.exception("batch %s: its record could not be read; no webhook event", ending.id)
        return None
    kind: WebhookEventType = f"batch.{ending.status}"  # type: ignore[assignment]
    return Event(event_id(entry_id, ending.id), kind, ending.id, ending.at, owner)


def signed_headers(key: bytes, event_id: str, body: bytes) -> dict[str, str]:
    """Standard Webhooks headers. The timestamp is this attempt's: receivers (the SDK) refuse one
    more than 5 minutes old, so each retry is signed anew, under the same webhook-id."""
    timestamp = str(int(time.time()))
    mac = hmac.new(key, f"{event_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return {
        "webhook-id": event_id,
        "webhook-timestamp": timestamp,
        "webhook-signature": "v1," + base64.b64encode(mac.digest()).decode(),
        "content-type": "application/json",
        "user-agent": "llmq-webhooks",
    }
