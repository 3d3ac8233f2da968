"""Health of the quota service: Redis, the broker, and the ledger's backlog.

A host without a Celery worker (or beat) still serves requests, but its usage never reaches
the ledger: the records wait in the Redis outboxes. That must be visible, so:

- ``health()`` gives the figures ``GET /quotas/health/`` and ``manage.py quotas_health``
  show: whether Redis answers, what this process knows of the broker, how many outboxes hold
  records waiting for their rows and how long the oldest has waited;
- every process that sends ledger records runs a ``BacklogWatch``: a daemon thread that reads
  the backlog every ``LEDGER_BACKLOG_CHECK_SECONDS`` (one Redis call, never on a request's
  path) and logs a warning, at most once per check, while the oldest record has waited longer
  than ``LEDGER_BACKLOG_WARN_SECONDS``.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

from quotas.conf import quota_settings
from quotas.engine.runtime import broker_state, get_store, guarded
from quotas.exceptions import StoreUnavailable

__all__ = ["BacklogWatch", "LedgerBacklog", "backlog_watch", "health", "ledger_backlog"]

logger = logging.getLogger("quotas")


@dataclass(frozen=True)
class LedgerBacklog:
    """Outboxes holding ledger records not yet written as rows, and how many seconds the
    oldest of those records has waited (``None`` when nothing waits)."""

    outboxes: int
    oldest_seconds: float | None

    @property
    def stale(self) -> bool:
        """Whether the oldest record has waited longer than ``LEDGER_BACKLOG_WARN_SECONDS``:
        no worker (or no beat) is writing the ledger."""
        limit = quota_settings.LEDGER_BACKLOG_WARN_SECONDS
        return self.oldest_seconds is not None and self.oldest_seconds > limit


def ledger_backlog() -> LedgerBacklog:
    """The ledger's backlog, read from Redis (one round trip); ``StoreUnavailable`` when
    Redis cannot be reached."""
    outboxes, oldest = guarded(get_store().backlog)
    return LedgerBacklog(outboxes, oldest)


def health() -> dict[str, Any]:
    """What ``GET /quotas/health/`` answers. ``status`` is ``"ok"`` when Redis answers and no
    ledger record has waited longer than ``LEDGER_BACKLOG_WARN_SECONDS``, else
    ``"degraded"``. ``broker`` is what this process learnt publishing ledger batches:
    ``"ok"``, ``"unavailable"`` (rows are then written directly) or ``"unknown"``."""
    try:
        backlog: LedgerBacklog | None = ledger_backlog()
    except StoreUnavailable:
        backlog = None
    ok = backlog is not None and not backlog.stale
    return {
        "status": "ok" if ok else "degraded",
        "redis": "ok" if backlog is not None else "unavailable",
        "broker": broker_state(),
        "ledger": {
            "outboxes_waiting": None if backlog is None else backlog.outboxes,
            "oldest_record_seconds": None if backlog is None else backlog.oldest_seconds,
            "warn_after_seconds": quota_settings.LEDGER_BACKLOG_WARN_SECONDS,
        },
    }


class BacklogWatch:
    """Logs a warning while ledger records wait too long: from a daemon thread of its own,
    once every ``LEDGER_BACKLOG_CHECK_SECONDS`` at most (``0``: never)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        # A forked child (gunicorn and Celery workers) starts a thread of its own.
        os.register_at_fork(after_in_child=self._after_fork)

    def start(self) -> None:
        """Start the thread, once per process (cheap to call on every ledger record)."""
        if self._thread is not None or quota_settings.LEDGER_BACKLOG_CHECK_SECONDS <= 0:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="quotas-backlog-watch", daemon=True
                )
                self._thread.start()

    def stop(self) -> None:
        """Stop the thread (tests); a later ``start`` does not restart it."""
        self._stopped.set()

    def check(self) -> LedgerBacklog | None:
        """Read the backlog once; log a warning if it is stale. ``None``: Redis unavailable
        (the circuit breaker logs that)."""
        try:
            backlog = ledger_backlog()
        except StoreUnavailable:
            return None
        if backlog.stale:
            logger.warning(
                "quotas: %d ledger outbox(es) hold records waiting for their rows; the oldest "
                "has waited %.1f s (over LEDGER_BACKLOG_WARN_SECONDS=%s). Is a Celery worker "
                "running, and beat with quotas.tasks.flush_ledger in its schedule?",
                backlog.outboxes,
                backlog.oldest_seconds,
                quota_settings.LEDGER_BACKLOG_WARN_SECONDS,
            )
        return backlog

    def _run(self) -> None:
        while True:
            interval = quota_settings.LEDGER_BACKLOG_CHECK_SECONDS
            if self._stopped.wait(interval if interval > 0 else 60.0):
                return
            if interval > 0:
                try:
                    self.check()
                except Exception:  # a watch must never die: the next check may work
                    logger.exception("quotas: the ledger backlog check failed")

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._thread = None


_watch: BacklogWatch | None = None


def backlog_watch() -> BacklogWatch:
    """This process's ``BacklogWatch``."""
    global _watch
    if _watch is None:
        _watch = BacklogWatch()
    return _watch
