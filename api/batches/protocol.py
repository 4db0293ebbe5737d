"""OpenAI wire models for the Files and Batch APIs, as `client.files.*` and `client.batches.*`
send and expect them (openai-python `types/file_object.py`, `types/batch.py`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.batches import BatchRecord, BatchStatus, Endpoint, LineError


class BatchCreateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input_file_id: str = Field(max_length=64)
    endpoint: Endpoint
    completion_window: Literal["24h"]
    # OpenAI's limits: at most 16 pairs, keys up to 64 characters, values up to 512.
    metadata: dict[str, str] | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None:
            if len(value) > 16:
                raise ValueError("at most 16 key-value pairs")
            if any(len(k) > 64 or len(v) > 512 for k, v in value.items()):
                raise ValueError("keys are at most 64 characters and values at most 512")
        return value


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[LineError]


class Batch(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: Endpoint
    model: str | None = None  # None: its lines name their own models, one or several
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts
    metadata: dict[str, str] | None = None

    @classmethod
    def of(cls, record: BatchRecord) -> Batch:
        # The record's own fields carry the wire names (timestamps, file ids, status); what the
        # wire nests or renames is added here.
        return cls.model_validate(
            {
                **record.spec.model_dump(include=set(cls.model_fields)),
                **record.model_dump(include=set(cls.model_fields)),
                "errors": BatchErrors(data=record.errors) if record.errors else None,
                "request_counts": RequestCounts(
                    total=record.total, completed=record.completed, failed=record.failed
                ),
            }
        )
