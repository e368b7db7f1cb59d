"""The Celery app: broker and result backend from REDIS_URL, beat schedule from
CELERY_BEAT_SCHEDULE, tasks discovered in the installed apps (`registry.tasks`).

Every `CELERY_*` Django setting configures it (Celery's `namespace="CELERY"`).
Without REDIS_URL tasks run eagerly in the caller (the embedded default runs
its periodic work with the in-process loop instead; see `registry.tasks`).
"""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "meshweb.settings")

app = Celery("meshweb")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
