"""Demo host project: uses the ``quotas`` app only through its public surface."""

from .celery import app as celery_app

__all__ = ["celery_app"]
