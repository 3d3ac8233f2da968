"""Work batched per process and sent from a background thread: ledger records on their way
to the Celery worker, and (with ``SETTLE_BATCH_SECONDS``) the middleware's settles on their
way to Redis, one pipelined round trip per batch.

For the ledger: a settle already put its record in the Redis outbox (atomically with the
settle), so a process that dies with records in its batch loses nothing: the
``flush_ledger`` sweep writes them. The batch is what makes the ledger independent of
Redis's durability within ``LEDGER_BATCH_SECONDS`` instead of within the sweep's period, at
the cost of one task per batch rather than one per request.

One daemon thread per process and kind sends the batch every ``LEDGER_BATCH_SECONDS`` (or
``SETTLE_BATCH_SECONDS``); a batch of ``LEDGER_BATCH_SIZE`` is sent at once by the thread
that filled it (filled from an event loop, ``add_nowait``: by the background thread, woken
for it), and so is a batch holding an *urgent* payload, one with no copy anywhere else (a
ledger record made while Redis was unreachable), by the background thread; what is left at
exit is sent by an ``atexit`` hook, which first waits (up to ``EXIT_WAIT_SECONDS``) for a
batch another thread is still sending: the background thread is a daemon, stopped where it
stands once the hooks have run, so a batch it had taken but not yet sent would otherwise be
lost (records made without Redis have no outbox copy). The thread is started on first use
in each process, so a forking server (gunicorn, Celery's prefork pool) gets one per
worker.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from django.db import close_old_connections

__all__ = ["EXIT_WAIT_SECONDS", "Batcher", "batch_interval"]

logger = logging.getLogger("quotas")

Payload = TypeVar("Payload")

# How long the exit hook waits for a batch another thread is sending (a server's graceful
# timeout, 30 s in gunicorn by default, bounds the whole exit).
EXIT_WAIT_SECONDS = 5.0


class Batcher(Generic[Payload]):
    """Collects payloads and hands them to ``send`` in batches, from one background thread."""

    def __init__(
        self,
        send: Callable[[list[Payload]], None],
        *,
        interval: Callable[[], float],
        size: Callable[[], int],
        name: str = "quotas-ledger-batch",
    ) -> None:
        self._send = send
        self._interval = interval
        self._size = size
        self._name = name
        self._lock = threading.Lock()
        self._sent = threading.Condition(self._lock)  # notified when a send ends
        self._sending = 0  # batches taken and not yet sent
        self._pending: list[Payload] = []
        self._started = False
        self._wake = threading.Event()  # set: the thread sends now, not at its next tick
        atexit.register(self.flush_at_exit)
        # A forked child starts empty (the parent's records are the parent's), with a fresh
        # lock (another thread may have held it at the fork), and starts its own thread.
        os.register_at_fork(after_in_child=self._after_fork)

    def add(self, payload: Payload, *, urgent: bool = False) -> None:
        """Queue ``payload`` for the next batch; a batch it fills is sent now, in this
        thread. ``urgent``: the batch must not wait for the next tick (the payload has no
        other copy anywhere), so the background thread is woken to send it at once."""
        if self._append(payload):
            self.flush()
        elif urgent:
            self._wake.set()

    def add_nowait(self, payload: Payload, *, urgent: bool = False) -> None:
        """``add`` that never sends in the caller's thread (for an event loop): a full batch,
        or an ``urgent`` payload, wakes the background thread, which sends it at once."""
        if self._append(payload) or urgent:
            self._wake.set()

    def _append(self, payload: Payload) -> bool:
        """Queue ``payload``; whether the batch is full now."""
        with self._lock:
            self._start_if_needed()
            self._pending.append(payload)
            return len(self._pending) >= self._size()

    def flush(self) -> int:
        """Send what is waiting now (in the caller's thread); returns how many were sent."""
        with self._lock:
            batch, self._pending = self._pending, []
            if not batch:
                return 0
            self._sending += 1
        try:
            self._send(batch)
        except Exception:
            # Ledger records: the outbox still has them for the sweep. Settles: their
            # reservations expire at RESERVATION_TTL_SECONDS, charged at the estimate.
            logger.exception("quotas: %s could not send %d records", self._name, len(batch))
        finally:
            with self._lock:
                self._sending -= 1
                self._sent.notify_all()
        return len(batch)

    def flush_at_exit(self, timeout: float = EXIT_WAIT_SECONDS) -> int:
        """Wait for the batches other threads are sending (up to ``timeout`` seconds), then
        send what is waiting; returns how many this call sent. The ``atexit`` hook."""
        with self._lock:
            if not self._sent.wait_for(lambda: self._sending == 0, timeout):
                logger.error(
                    "quotas: %s still sending a batch after %.1f s at exit",
                    self._name,
                    timeout,
                )
        return self.flush()

    def __len__(self) -> int:
        return len(self._pending)

    def _start_if_needed(self) -> None:
        if not self._started:
            self._started = True
            threading.Thread(target=self._run, name=self._name, daemon=True).start()

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._sent = threading.Condition(self._lock)
        self._sending = 0  # the parent's sends are the parent's
        self._pending = []
        self._started = False
        self._wake = threading.Event()

    def _run(self) -> None:
        while True:
            if self._wake.wait(self._interval()):
                self._wake.clear()
            if self.flush():
                # A batch written to the database directly (the broker was down) opened
                # this thread's connection: close it as a request would.
                close_old_connections()


def batch_interval(seconds: float) -> float:
    """A batch thread's sleep for a ``*_BATCH_SECONDS`` setting: 0 turns batching off
    (nothing is queued), so a thread started earlier wakes rarely."""
    return float(seconds) if seconds > 0 else 1.0
