"""``manage.py quotas_backfill_rollups``: roll up a ledger written before rollups existed."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from quotas import ledger


class Command(BaseCommand):
    help = (
        "Roll up the ledger rows written before usage rollups existed (those reserved before "
        "the hour of the earliest rollup), once, after upgrading. Safe to run again."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        cutoff = ledger.backfill_cutoff()
        written = ledger.backfill_rollups()
        self.stdout.write(
            self.style.SUCCESS(f"{written} hourly bucket(s) rolled up from rows before {cutoff}.")
        )
