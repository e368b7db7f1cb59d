"""meshweb: the Django project (settings, URLs, ASGI app, Celery app, CLI)."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # Django's docs import the Celery app here eagerly; that costs ~130 ms on
    # every `mesh` command, so it loads on first use instead. Tasks bind to it
    # explicitly (`@app.task` in registry.tasks), and `celery -A meshweb` still
    # finds it (Celery falls back to `meshweb.celery`).
    if name == "celery_app":
        from meshweb.celery import app

        return app
    raise AttributeError(f"module 'meshweb' has no attribute {name!r}")
