"""How the API and worker processes log: readable text by default, JSON with LOG_FORMAT=json,
and the job id on every line written while a job is being handled, in the API and the worker."""

from __future__ import annotations

import logging
from contextvars import ContextVar

from pythonjsonlogger.json import JsonFormatter

# Set by the API when it creates a job and by the worker task while it runs one.
job_id_var: ContextVar[str | None] = ContextVar("job_id", default=None)

_TEXT = "%(asctime)s %(levelname)s %(name)s [%(job_id)s] %(message)s"
_JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(process)d %(job_id)s %(message)s"


class JobIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.job_id = job_id_var.get() or "-"
        return True


def formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter(_JSON_FIELDS, rename_fields={"levelname": "level", "asctime": "time"})
    return logging.Formatter(_TEXT)


def install(handlers: list[logging.Handler], log_format: str) -> None:
    """Give existing handlers our format and the job-id filter."""
    for handler in handlers:
        handler.setFormatter(formatter(log_format))
        if not any(isinstance(f, JobIdFilter) for f in handler.filters):
            handler.addFilter(JobIdFilter())


def configure(level: str, log_format: str, loggers: tuple[str, ...] = ()) -> None:
    """Root logging for a process we own (the API): one stderr handler; named loggers that
    bring their own handlers (uvicorn's) are routed to it."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    root.setLevel(level)
    install(root.handlers, log_format)
    for name in loggers:
        named = logging.getLogger(name)
        named.handlers.clear()
        named.propagate = True
