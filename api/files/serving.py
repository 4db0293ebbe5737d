"""The Files API's requests: upload, list, read and delete files.

Files belong to the key that uploaded them (api.edge.auth): for any other key they do not exist
(404), as with background responses and batches.
"""

from __future__ import annotations

import re

from api import errors
from api.files.protocol import FileObject, Page
from tasks.files import FileRecord, FileStore
from tasks.settings import Settings

FILE_ID = re.compile(r"file-[0-9a-f]{24}")
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
