"""Files (the Files API's storage): batch inputs that clients upload, and the output and error
files batches write. They live in Redis, so every API instance sees them, and they outlive the
jobs that produced them, until deleted or expired (FILE_TTL_SECONDS).

A file costs its size in Redis memory (and in the AOF). README "Batch API" says what that means
for an operator and where large files would go instead.
"""

from __future__ import annotations

import secrets
import time
from typing import Literal, cast

import redis.asyncio as aioredis
from pydantic import BaseModel

from tasks import keys

Purpose = Literal["batch", "batch_output"]
CHUNK_BYTES = 8 * 1024 * 1024


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


class FileRecord(BaseModel):
    id: str
    bytes: int
    created_at: int
    expires_at: int
    filename: str
    purpose: Purpose
    owner: str | None = None  # api.edge.auth.owner_tag of the key that made it; None without API_KEYS


class FileStore:
    """Async, on a client that returns bytes: a file's content is whatever was uploaded."""

    def __init__(self, client: aioredis.Redis, ttl_seconds: int) -> None:
        self._redis = client
        self._ttl = ttl_seconds

    def new_record(
        self, filename: str, purpose: Purpose, size: int, owner: str | None, file_id: str | None = None
    ) -> FileRecord:
        now = int(time.time())
        return FileRecord(
            id=file_id or new_file_id(),
            bytes=size,
            created_at=now,
            expires_at=now + self._ttl,
            filename=filename,
            purpose=purpose,
            owner=owner,
        )

    async def put(self, record: FileRecord, content: bytes) -> None:
        """Store the file (replacing one with the same id: batch outputs are rewritten whole).

        In pieces of CHUNK_BYTES: one Redis value holds at most 512 MB (proto-max-bulk-len), and
        smaller values keep any one command short."""
        key = keys.file(record.id)
        pieces: dict[str | bytes, bytes | str | int] = {
            f"c{i}": content[start : start + CHUNK_BYTES]
            for i, start in enumerate(range(0, len(content), CHUNK_BYTES))
        }
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(key)
        pipe.hset(key, mapping={"meta": record.model_dump_json(), "chunks": len(pieces), **pieces})  # type: ignore[dict-item]
        pipe.expireat(key, record.expires_at)
        pipe.zadd(keys.files_of(record.owner), {record.id: record.created_at})
        await pipe.execute()

    async def get(self, file_id: str, owner: str | None) -> FileRecord | None:
        """The file's record, or None if there is none for this owner."""
        meta = await self._redis.hget(keys.file(file_id), "meta")  # type: ignore[misc]
        if meta is None:
            return None
        record = FileRecord.model_validate_json(meta)
        return record if record.owner == owner else None

    async def content(self, file_id: str) -> bytes | None:
        key = keys.file(file_id)
        chunks = await self._redis.hget(key, "chunks")  # type: ignore[misc]
        if chunks is None:
            return None
        if int(chunks) == 0:
            return b""
        pieces = cast(list[bytes | None], await self._redis.hmget(key, [f"c{i}" for i in range(int(chunks))]))  # type: ignore[misc]
        if any(p is None for p in pieces):
            return None  # deleted or expired while being read
        return b"".join(cast(list[bytes], pieces))

    async def delete(self, record: FileRecord) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(keys.file(record.id))
        pipe.zrem(keys.files_of(record.owner), record.id)
        await pipe.execute()

    async def of_owner(self, owner: str | None, *, newest_first: bool) -> list[FileRecord]:
        """The owner's files in creation order; ids whose file expired are dropped from the index."""
        index = keys.files_of(owner)
        raw = cast(list[bytes], await self._redis.zrange(index, 0, -1, desc=newest_first))
        ids = [i.decode() for i in raw]
        if not ids:
            return []
        metas = await self._metas(ids)
        gone = [i for i, m in zip(ids, metas, strict=True) if m is None]
        if gone:
            await self._redis.zrem(index, *gone)
        return [FileRecord.model_validate_json(m) for m in metas if m is not None]

    async def _metas(self, ids: list[str]) -> list[bytes | None]:
        pipe = self._redis.pipeline(transaction=False)
        for file_id in ids:
            pipe.hget(keys.file(file_id), "meta")
        return list(await pipe.execute())
