"""The Celery app: broker and result backend from REDIS_URL, beat schedule from
CELERY_BEAT_SCHEDULE, tasks discovered in the installed apps (`registry.tasks`).

Every `CELERY_*` Django setting configures it (Celery's `namespace="CELERY"`).
Without REDIS_URL tasks run eagerly in the caller (the embedded default runs
its periodic work with the in-process loop instead; see `registry.tasks`).
"""

from __future__ import annotations

import logging
import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "meshweb.settings")

app = Celery("meshweb")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


class _QuietTicks(logging.Filter):
    """Beat sends `tick` every second or so: its routine "sending / received /
    succeeded" lines would drown the log. They show at --loglevel debug."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO or TICK_TASK not in record.getMessage():
            return True
        return logging.getLogger("celery").isEnabledFor(logging.DEBUG)


TICK_TASK = "registry.tasks.tick"
for _name in ("celery.app.trace", "celery.worker.strategy", "celery.beat"):
    logging.getLogger(_name).addFilter(_QuietTicks())
