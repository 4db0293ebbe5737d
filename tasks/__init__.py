"""The queue between the API and the workers: Celery app, job records, events, the generate task.

`celery -A tasks worker` finds `app` here.
"""

from tasks.celery_app import app

__all__ = ["app"]
