"""The Batch API's requests: create, list, read and cancel batches. The work itself is done by
api/batches/runner.py, on every API instance.

Batches belong to the key that created them (api.edge.auth): for any other key they do not
exist (404), as with files and background responses.
"""

from __future__ import annotations

import asyncio
import re
import time

from api import errors
from api.batches import lines as batch_lines
from api.batches.protocol import Batch, BatchCreateRequest
from api.files.protocol import Page
from api.files.serving import FilesService
from tasks.batches import BatchStore
from tasks.settings import Settings

BATCH_ID = re.compile(r"batch_[0-9a-f]{32}")


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
        spec = await self._batches.new_spec(
            self._settings.batch_completion_window_seconds,
            endpoint=request.endpoint,
            input_file_id=record.id,
            completion_window=request.completion_window,
            metadata=request.metadata,
            owner=self._owner,
        )
        await self._batches.create(spec)
        return await self.get(spec.id)

    async def get(self, batch_id: str) -> Batch:
        record = await self._batches.get(batch_id) if BATCH_ID.fullmatch(batch_id) else None
        if record is None or record.spec.owner != self._owner:
            raise errors.NotFound(f"No batch with id '{batch_id[:80]}'.", param="batch_id")
        return Batch.of(record)

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
                page.append(Batch.of(record))
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
