"""Dependencies the routes receive: settings, the job client and the caller's identity."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.auth import caller
from tasks.client import JobClient
from tasks.settings import Settings, get_settings


def job_client(request: Request) -> JobClient:
    client: JobClient = request.app.state.jobs
    return client


SettingsDep = Annotated[Settings, Depends(get_settings)]
JobsDep = Annotated[JobClient, Depends(job_client)]
# The caller's owner tag (api.auth); None when API_KEYS is empty.
CallerDep = Annotated[str | None, Depends(caller)]
