"""The Celery application shared by the API (which sends tasks) and the workers (which run them)."""

from celery import Celery

# `include` is imported by workers only; the API sends tasks by name and never imports the
# worker side, so it never loads torch.
app = Celery("llmq", include=["tasks.generate"])
app.config_from_object("celeryconfig")
