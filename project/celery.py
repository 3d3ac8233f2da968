"""Celery application of the demo project."""

import os
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import worker_ready

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

app = Celery("project")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_ready.connect
def _tell_make_run(**kwargs: Any) -> None:
    """``make run`` prints its banner once the worker is ready too (after its start-up lines):
    it names a file for the worker to create then."""
    ready_file = os.environ.get("DEMO_WORKER_READY_FILE")
    if ready_file:
        Path(ready_file).touch()
