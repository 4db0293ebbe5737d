"""OpenAI wire models for the Files API, as `client.files.*` sends and expects them
(openai-python `types/file_object.py`), and the list page the Files and Batch APIs share."""

from __future__ import annotations

from typing import Generic, Literal, TypeVar

from pydantic import BaseModel

from tasks.files import FileRecord, Purpose

T = TypeVar("T")


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    expires_at: int | None
    filename: str
    purpose: Purpose
    # Deprecated in OpenAI's API, still sent (and typed as required by older SDKs).
    status: Literal["uploaded", "processed", "error"] = "processed"

    @classmethod
    def of(cls, record: FileRecord) -> FileObject:
        return cls(**record.model_dump(exclude={"owner"}))


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class Page(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False
