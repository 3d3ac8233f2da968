"""``manage.py quotas_rebuild [--user ID ...]``: seed lost Redis windows from the ledger."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from quotas import ledger
from quotas.exceptions import StoreUnavailable


class Command(BaseCommand):
    help = (
        "Rebuild the token windows Redis lost, from the usage ledger: every user with usage in "
        "the last window, or the users named with --user. Windows that exist are untouched."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--user", type=int, action="append", dest="user_ids", metavar="ID",
            help="Rebuild only this user's window (repeatable).",
        )  # fmt: skip

    def handle(self, *args: Any, user_ids: list[int] | None = None, **options: Any) -> None:
        try:
            rebuilt = ledger.rebuild_windows(user_ids)
        except StoreUnavailable as exc:
            raise CommandError(f"Redis is unavailable: {exc}") from exc
        for scope in rebuilt:
            self.stdout.write(f"rebuilt {scope}")
        self.stdout.write(self.style.SUCCESS(f"{len(rebuilt)} window(s) rebuilt."))
