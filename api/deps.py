"""Dependencies the routes receive: settings and the job client."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from tasks.client import JobClient
from tasks.settings import Settings, get_settings


def job_client(request: Request) -> JobClient:
    client: JobClient = request.app.state.jobs
    return client


SettingsDep = Annotated[Settings, Depends(get_settings)]
JobsDep = Annotated[JobClient, Depends(job_client)]
