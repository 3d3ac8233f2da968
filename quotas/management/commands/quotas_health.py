"""``manage.py quotas_health``: Redis, the broker and the ledger's backlog; exits 1 when
degraded (for cron jobs and container health checks)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from quotas.services import health


class Command(BaseCommand):
    help = (
        "Show whether Redis answers and how long ledger records have waited in Redis for a "
        "Celery worker to write them (as GET /quotas/health/ does). Exits 1 when degraded."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        report = health()
        ledger = report["ledger"]
        oldest = ledger["oldest_record_seconds"]
        self.stdout.write(f"redis: {report['redis']}")
        self.stdout.write(f"broker (as this process knows it): {report['broker']}")
        self.stdout.write(f"ledger outboxes waiting: {ledger['outboxes_waiting']}")
        self.stdout.write(
            f"oldest waiting record: {'-' if oldest is None else f'{oldest:.1f} s'} "
            f"(warn after {ledger['warn_after_seconds']} s)"
        )
        if report["status"] != "ok":
            raise CommandError(
                "degraded: Redis is unavailable, or ledger records wait longer than "
                "LEDGER_BACKLOG_WARN_SECONDS (is a Celery worker running, and beat?)",
                returncode=1,
            )
        self.stdout.write(self.style.SUCCESS("ok"))
