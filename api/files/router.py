"""/v1/files: upload (multipart), list, retrieve, download and delete files."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.responses import Response

from api.deps import CallerDep, FilesDep, SettingsDep
from api.files.protocol import FileDeleted, FileObject, Page
from api.files.serving import MAX_PAGE, FilesService

router = APIRouter()


def service(files: FilesDep, settings: SettingsDep, owner: CallerDep) -> FilesService:
    return FilesService(files, settings, owner)


ServiceDep = Annotated[FilesService, Depends(service)]


@router.post("/v1/files")
async def upload_file(
    svc: ServiceDep, file: Annotated[UploadFile, File()], purpose: Annotated[str, Form(max_length=64)]
) -> FileObject:
    return await svc.upload(file.filename or "", purpose, await file.read())


@router.get("/v1/files")
async def list_files(
    svc: ServiceDep,
    purpose: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = MAX_PAGE,
    after: Annotated[str | None, Query(max_length=64)] = None,
    order: Literal["asc", "desc"] = "desc",
) -> Page[FileObject]:
    return await svc.page(purpose, limit, after, order)


@router.get("/v1/files/{file_id}")
async def retrieve_file(file_id: str, svc: ServiceDep) -> FileObject:
    return FileObject.of(await svc.get(file_id))


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, svc: ServiceDep) -> Response:
    return Response(await svc.content(file_id), media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, svc: ServiceDep) -> FileDeleted:
    record = await svc.delete(file_id)
    return FileDeleted(id=record.id)
