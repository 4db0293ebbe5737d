"""The service's configuration: one pydantic-settings class, read from the environment and `.env`."""

from __future__ import annotations

import base64
import binascii
import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Kept equal to model.loading.EMBEDDED_MODEL_ID; duplicated because the API process must be able
# to read settings without importing the model package (and with it torch).
EMBEDDED_MODEL_ID = "SmolLM2-135M-Instruct"

# The events a webhook endpoint may receive (api/webhooks/), as OpenAI names them.
WebhookEventType = Literal[
    "response.completed",
    "response.incomplete",
    "response.failed",
    "response.cancelled",
    "batch.completed",
    "batch.failed",
    "batch.expired",
    "batch.cancelled",
]


def check_webhook_url(url: str) -> str:
    """An absolute http(s) URL with a host: checked at startup, so a typo stops the service
    instead of failing every delivery for 72 hours."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"a webhook URL must be an absolute http:// or https:// URL, not {url!r}")
    return url


def webhook_key(secret: str) -> bytes:
    """The HMAC key of a signing secret, as the openai SDK's webhooks.verify_signature derives
    it: the base64-decoded part of a `whsec_...` secret, else the secret's own bytes."""
    if not secret.startswith("whsec_"):
        return secret.encode()
    try:
        return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except binascii.Error:
        raise ValueError("a whsec_ webhook secret must be base64 after its prefix") from None


class WebhookEndpoint(BaseModel):
    """One receiver of webhook events (WEBHOOK_ENDPOINTS): its URL and signing secret, and
    optionally which event types and whose events (API keys; None = every key's) it gets."""

    url: str
    secret: str
    events: list[WebhookEventType] | None = None
    api_keys: list[str] | None = None

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        return check_webhook_url(url)

    @field_validator("secret")
    @classmethod
    def _usable_secret(cls, secret: str) -> str:
        if not webhook_key(secret):
            raise ValueError("a webhook secret must not be empty")
        return secret


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", protected_namespaces=())

    # The original service's three settings (shared/seed.md): the model, 4-bit, the device.
    model_id: str = Field(EMBEDDED_MODEL_ID, description="Hub id, local HF directory, .gguf file")
    use_4bit: bool = Field(True, description="4-bit NF4 via bitsandbytes; CUDA only")
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"

    engine: Literal["auto", "transformers", "llama.cpp"] = Field(
        "auto", description="auto: llama.cpp for GGUF when installed (not on CUDA), else transformers"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    compute_threads: int = Field(
        0,
        ge=0,
        # TORCH_THREADS was this setting's name before the llama.cpp engine; still read.
        validation_alias=AliasChoices("compute_threads", "torch_threads"),
        description="CPU compute threads per worker; 0 = one per physical core",
    )
    worker_slots: int = Field(
        1, ge=1, le=256, description="Generations one worker batches at once (one model copy)"
    )
    # The prefill policy (model/prefill.py): how a new prompt shares the loop with running streams.
    prefill_stall_seconds: float = Field(
        0.6, gt=0, le=10, description="Longest a prefill step may hold running streams (llama.cpp)"
    )
    prefill_share: float = Field(
        0.9, gt=0, le=1, description="Most of the loop's time prefill takes while streams run (llama.cpp)"
    )
    served_model_name: str | None = Field(None, description="Name clients use; default MODEL_ID")
    model_cache_dir: Path = Path.home() / ".cache" / "llama3-chat" / "models"

    # Redis: every client and Celery's broker are built from these in tasks/redis.py.
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description=(
            "redis://, rediss:// (TLS), unix://, or Sentinel: sentinel://[user:pass@]h1:26379[/db];"
            "sentinel://h2:26379; an ACL user and password (the data nodes') go in the (first) URL"
        ),
    )
    redis_connect_timeout_seconds: float = Field(1.0, gt=0, description="Longest wait to connect to Redis")
    redis_timeout_seconds: float = Field(10.0, gt=0, description="Longest wait for one Redis reply")
    redis_retries: int = Field(
        1, ge=0, le=10, description="Retries of a Redis command after a lost connection or timeout"
    )
    # TLS (a rediss:// REDIS_URL): whom to trust and, if Redis asks clients for one
    # (tls-auth-clients), the certificate to show. Empty: the system's CAs, no client certificate.
    redis_tls_ca_file: Path | None = Field(None, description="CA bundle that signed Redis's certificate")
    redis_tls_cert_file: Path | None = Field(None, description="Client certificate for Redis (PEM)")
    redis_tls_key_file: Path | None = Field(None, description="Key of REDIS_TLS_CERT_FILE (PEM)")
    # Sentinel (a sentinel:// REDIS_URL, tasks/redis.py): the URL's credentials reach only the data
    # nodes (master and replicas); the sentinels take their own, or none.
    redis_sentinel_master: str = Field("mymaster", description="Name the sentinels monitor the master as")
    redis_sentinel_username: str = Field("", description="ACL user on the sentinels; empty = none")
    redis_sentinel_password: str = Field("", description="Password on the sentinels; empty = no auth")
    redis_sentinel_tls: bool = Field(
        False, description="Sentinels and data nodes on TLS (with REDIS_TLS_*): a sentinel:// URL's rediss"
    )
    redis_failover_seconds: float = Field(
        15.0,
        gt=0,
        le=120,
        description="Sentinel only: the most a call waits between retries through a failover, in all",
    )
    # WAIT after the writes that must not be lost (tasks/scripts.py): 0 = off.
    redis_wait_replicas: int = Field(
        0, ge=0, le=10, description="Replicas that must acknowledge a job's admit, claim and end"
    )
    redis_wait_timeout_ms: int = Field(
        1000, ge=1, le=60_000, description="Longest WAIT for REDIS_WAIT_REPLICAS (ms); then go on"
    )
    host: str = "127.0.0.1"
    port: int = 8000
    job_ttl_seconds: int = Field(86_400, ge=60, description="How long job records and logs live")
    request_timeout_seconds: float = Field(600.0, gt=0, description="Longest an API call waits")
    stream_ping_seconds: float = Field(15.0, gt=0, description="SSE keep-alive while waiting")
    stream_coalesce_seconds: float = Field(
        0.03, ge=0, le=1, description="Text within this of the last delta joins the next one; 0 = per token"
    )
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"

    # Security and request limits.
    api_keys: str = Field("", description="Comma-separated keys; empty = no auth")
    max_request_bytes: int = Field(1 << 20, ge=1024, description="Largest request body")
    max_messages: int = Field(256, ge=1, description="Most messages in one request")
    max_tokens_limit: int = Field(4096, ge=1, description="Largest max_tokens a request may ask")
    max_n: int = Field(8, ge=1, description="Most choices (`n`) one chat completion may ask")

    # Overload, deadlines and fault recovery.
    max_queued: int = Field(
        100, ge=1, description="Waiting jobs of one model beyond which its requests get 429"
    )
    # Fair shares between API keys (tasks/jobs.py, the fair index). Interactive jobs only: a
    # batch's lines wait in their key's batch tier and count against neither.
    max_queued_per_key: int = Field(
        0, ge=0, description="Waiting jobs one API key may have (all models); 0 = no limit"
    )
    max_running_per_key: int = Field(
        0, ge=0, description="Running jobs one API key may have (all models); 0 = no limit"
    )
    api_key_weights: str = Field(
        "", description='Per-key shares, "key=weight,..." (weights > 0); keys not named weigh 1'
    )
    model_forget_seconds: float = Field(
        3600.0,
        ge=0,
        description="How long the API still knows a model (503, not 404) after its last worker left",
    )
    queue_timeout_seconds: float = Field(600.0, gt=0, description="A job queued longer fails")
    max_generation_seconds: float = Field(600.0, gt=0, description="A generation running longer stops")
    shutdown_grace_seconds: float = Field(10.0, ge=0, description="SIGTERM: time to finish a job")
    job_lease_seconds: int = Field(15, ge=3, description="Running job with no live worker this long fails")
    broker_visibility_timeout_seconds: int = Field(3600, ge=5, description="Redis broker redelivery")

    # The Batch API (README "Batch API").
    max_file_bytes: int = Field(200 * 1024 * 1024, ge=1024, description="Largest file upload")
    max_batch_lines: int = Field(50_000, ge=1, description="Most requests in one batch")
    batch_completion_window_seconds: int = Field(
        86_400, ge=1, description='What a batch\'s "24h" completion window means here'
    )
    file_ttl_seconds: int = Field(
        30 * 86_400, ge=60, description="How long files (and ended batches) are kept"
    )

    # Per-key rate limits (tasks/quotas.py, README "Rate limits"): token buckets per API key,
    # or one for every caller without API_KEYS. Batch lines are outside them.
    requests_per_minute_per_key: int = Field(
        0, ge=0, description="Generation requests a key may make per minute; 0 = off"
    )
    tokens_per_minute_per_key: int = Field(
        0, ge=0, description="Prompt + completion tokens a key may use per minute; 0 = off"
    )

    # Webhooks (api/webhooks/, README "Webhooks"): signed events when a background response or a
    # batch ends, delivered at least once by the API instances.
    webhook_url: str = Field("", description="Receives every event of every key; empty = none")
    webhook_secret: str = Field("", description="WEBHOOK_URL's signing secret: whsec_<base64>")
    # NoDecode: read as JSON by the validator below, so that an empty variable means none.
    webhook_endpoints: Annotated[list[WebhookEndpoint], NoDecode] = Field(
        default_factory=list,
        description="More endpoints: a JSON list of {url, secret, events?, api_keys?}",
    )
    webhook_timeout_seconds: float = Field(
        10.0, gt=0, le=300, description="A delivery not answered 2xx within this is retried"
    )
    webhook_retry_seconds: int = Field(
        72 * 3600, ge=1, description="How long a failing delivery is retried before it is failed"
    )
    webhook_backoff_seconds: float = Field(5.0, gt=0, description="Delay before the first retry")
    webhook_backoff_max_seconds: float = Field(3600.0, gt=0, description="Longest delay between retries")
    webhook_max_in_flight: int = Field(
        32, ge=1, le=1000, description="Deliveries one API instance sends at once"
    )
    admin_api_key: str = Field(
        "", description="Key for GET /v1/webhooks/deliveries; empty = open only without API_KEYS"
    )

    @field_validator("webhook_endpoints", mode="before")
    @classmethod
    def _webhook_endpoints_json(cls, value: object) -> object:
        if isinstance(value, str):
            return json.loads(value) if value.strip() else []
        return value

    @field_validator("redis_tls_ca_file", "redis_tls_cert_file", "redis_tls_key_file", mode="before")
    @classmethod
    def _no_file_when_empty(cls, value: object) -> object:
        # compose passes a variable set empty in .env on as "", which would be the path ".".
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url(cls, url: str) -> str:
        return check_webhook_url(url) if url else url

    @model_validator(mode="after")
    def _webhook_secret_with_url(self) -> Settings:
        if self.webhook_url and not webhook_key(self.webhook_secret):
            raise ValueError("WEBHOOK_URL needs WEBHOOK_SECRET, the secret its events are signed with")
        return self

    @model_validator(mode="after")
    def _wait_within_a_reply(self) -> Settings:
        # WAIT shares a round trip with the writes it follows: one longer than the reply timeout
        # would time that round trip out, and a retry would send the writes again.
        if self.redis_wait_replicas and self.redis_wait_timeout_ms >= 500 * self.redis_timeout_seconds:
            raise ValueError("REDIS_WAIT_TIMEOUT_MS must be under half of REDIS_TIMEOUT_SECONDS")
        return self

    @property
    def webhook_endpoint_list(self) -> list[WebhookEndpoint]:
        """Every registered endpoint: WEBHOOK_URL's (every event of every key) first."""
        if not self.webhook_url:
            return list(self.webhook_endpoints)
        return [WebhookEndpoint(url=self.webhook_url, secret=self.webhook_secret), *self.webhook_endpoints]

    @property
    def api_key_weight_map(self) -> dict[str, float]:
        """API_KEY_WEIGHTS as key -> weight. Raises ValueError, naming no key, for a malformed
        value: the API reads it at start-up and stops. Not a field validator, whose error would
        quote the value, keys and all, into the log."""
        return _parse_weights(self.api_key_weights)

    @property
    def api_key_list(self) -> list[str]:
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model_id


def _parse_weights(value: str) -> dict[str, float]:
    weights: dict[str, float] = {}
    for item in (i.strip() for i in value.split(",")):
        if not item:
            continue
        key, sep, weight = item.rpartition("=")
        try:
            number = float(weight)
        except ValueError:
            number = 0.0
        if not sep or not key.strip() or not number > 0 or number == float("inf"):
            raise ValueError("API_KEY_WEIGHTS: each item is key=weight, with a weight above 0")
        weights[key.strip()] = number
    return weights


@lru_cache
def get_settings() -> Settings:
    return Settings()
