"""The Files and Batch APIs' requests: upload, list, read and delete files; create, list, read
and cancel batches. The work itself is done by api/batch_runner.py, on every API instance.

Files and batches belong to the key that created them (api.auth.owner_tag): for any other key
they do not exist (404), as with background responses.
"""

from __future__ import annotations

import asyncio
import re
import time

from api import batch_lines, errors
from api.batch_protocol import Batch, BatchCreateRequest, FileObject, Page
from tasks.batches import BatchStore
from tasks.files import FileRecord, FileStore
from tasks.settings import Settings

FILE_ID = re.compile(r"file-[0-9a-f]{24}")
BATCH_ID = re.compile(r"batch_[0-9a-f]{32}")
MAX_PAGE = 10_000  # OpenAI's largest `limit` for files
MAX_FILENAME_CHARS = 255


class FilesService:
    def __init__(self, files: FileStore, settings: Settings, owner: str | None) -> None:
        self._files = files
        self._settings = settings
        self._owner = owner

    async def upload(self, filename: str, purpose: str, content: bytes) -> FileObject:
        if purpose != "batch":
            raise errors.InvalidRequest(
                f"Files with purpose '{purpose[:40]}' are not supported here; use 'batch'.",
                param="purpose",
                code="unsupported_value",
            )
        if len(content) > self._settings.max_file_bytes:
            raise errors.RequestTooLarge(
                f"The file is larger than this server's limit of {self._settings.max_file_bytes} bytes."
            )
        if not content:
            raise errors.InvalidRequest("The file is empty.", param="file", code="empty_file")
        name = filename.replace("\x00", "")[:MAX_FILENAME_CHARS] or "upload.jsonl"
        record = self._files.new_record(name, "batch", len(content), self._owner)
        await self._files.put(record, content)
        return FileObject.of(record)

    async def get(self, file_id: str) -> FileRecord:
        record = await self._files.get(file_id, self._owner) if FILE_ID.fullmatch(file_id) else None
        if record is None:
            raise errors.NotFound(f"No file with id '{file_id[:80]}'.", param="file_id")
        return record

    async def content(self, file_id: str) -> bytes:
        record = await self.get(file_id)
        content = await self._files.content(record.id)
        if content is None:  # deleted or expired between the two reads
            raise errors.NotFound(f"No file with id '{file_id[:80]}'.", param="file_id")
        return content

    async def delete(self, file_id: str) -> FileRecord:
        record = await self.get(file_id)
        await self._files.delete(record)
        return record

    async def page(self, purpose: str | None, limit: int, after: str | None, order: str) -> Page[FileObject]:
        records = await self._files.of_owner(self._owner, newest_first=order == "desc")
        if purpose is not None:
            records = [r for r in records if r.purpose == purpose]
        ids = [r.id for r in records]
        start = ids.index(after) + 1 if after in ids else 0
        page = records[start : start + limit]
        return Page[FileObject](
            data=[FileObject.of(r) for r in page],
            first_id=page[0].id if page else None,
            last_id=page[-1].id if page else None,
            has_more=start + limit < len(records),
        )


class BatchesService:
    def __init__(
        self, batches: BatchStore, files: FilesService, settings: Settings, owner: str | None
    ) -> None:
        self._batches = batches
        self._files = files
        self._settings = settings
        self._owner = owner

    async def create(self, request: BatchCreateRequest) -> Batch:
        try:
            record = await self._files.get(request.input_file_id)
        except errors.NotFound:
            raise errors.NotFound(
                f"No file with id '{request.input_file_id[:80]}'.", param="input_file_id"
            ) from None
        if record.purpose != "batch":
            raise errors.InvalidRequest(
                "The input file must have been uploaded with purpose 'batch'.",
                param="input_file_id",
                code="invalid_value",
            )
        content = await self._files.content(record.id)
        lines = await asyncio.to_thread(batch_lines.count_lines, content)
        if lines > self._settings.max_batch_lines:
            most = self._settings.max_batch_lines
            raise errors.InvalidRequest(
                f"The input file has {lines} requests; a batch holds at most {most}.",
                param="input_file_id",
                code="too_many_requests",
            )
        spec = self._batches.new_spec(
            endpoint=request.endpoint,
            input_file_id=record.id,
            completion_window=request.completion_window,
            metadata=request.metadata,
            expires_at=int(time.time()) + self._settings.batch_completion_window_seconds,
            owner=self._owner,
        )
        await self._batches.create(spec)
        return await self.get(spec.id)

    async def get(self, batch_id: str) -> Batch:
        record = await self._batches.get(batch_id) if BATCH_ID.fullmatch(batch_id) else None
        if record is None or record.spec.owner != self._owner:
            raise errors.NotFound(f"No batch with id '{batch_id[:80]}'.", param="batch_id")
        return Batch.of(record, self._settings.model_name)

    async def page(self, limit: int, after: str | None) -> Page[Batch]:
        ids = await self._batches.owned(self._owner)
        start = ids.index(after) + 1 if after in ids else 0
        page: list[Batch] = []
        gone: list[str] = []
        position = start
        while position < len(ids) and len(page) < limit:
            record = await self._batches.get(ids[position])
            if record is None:
                gone.append(ids[position])
            else:
                page.append(Batch.of(record, self._settings.model_name))
            position += 1
        await self._batches.forget(self._owner, gone)
        return Page[Batch](
            data=page,
            first_id=page[0].id if page else None,
            last_id=page[-1].id if page else None,
            has_more=position < len(ids),
        )

    async def cancel(self, batch_id: str) -> Batch:
        batch = await self.get(batch_id)
        if batch.status in ("cancelling", "cancelled"):
            return batch
        moved = await self._batches.transition(
            batch_id, ("validating", "in_progress"), "cancelling", cancelling_at=int(time.time())
        )
        if not moved:
            batch = await self.get(batch_id)
            if batch.status not in ("cancelling", "cancelled"):
                raise errors.Conflict(
                    f"The batch has status '{batch.status}' and can no longer be cancelled.",
                    code="batch_not_cancellable",
                )
        return await self.get(batch_id)
