"""``manage.py quotas_budget <username or id>``: a user's budget and recent usage."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from quotas import services
from quotas.exceptions import ConfigurationError
from quotas.models import UsageRecord

BUDGET_FIELDS = (
    "limit",
    "used",
    "reserved",
    "remaining",
    "debt",
    "reset_seconds",
    "window_seconds",
)


class Command(BaseCommand):
    help = "Show a user's token budget (as GET /quotas/me/ shows it) and their recent usage."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("user", help="Username, or the user's primary key.")
        parser.add_argument(
            "--records", type=int, default=10, help="Recent usage records to list (default 10)."
        )

    def handle(self, *args: Any, user: str, records: int, **options: Any) -> None:
        account = self._find(user)
        try:
            budget = services.budget_for(account)
        except ConfigurationError as exc:
            raise CommandError(str(exc)) from exc
        plan = budget["plan"]
        self.stdout.write(f"user: {account.get_username()} (id {account.pk})")
        self.stdout.write(f"plan: {plan['name']} ({plan['slug']})")
        for field in BUDGET_FIELDS:
            self.stdout.write(f"{field}: {budget[field]}")
        if budget.get("degraded"):
            self.stdout.write(self.style.WARNING("Redis is unavailable: live figures unknown."))
        self._write_records(account, records)

    def _find(self, name_or_id: str) -> Any:
        users = get_user_model()._default_manager
        user = users.filter(**{users.model.USERNAME_FIELD: name_or_id}).first()
        if user is None and name_or_id.isdigit():
            user = users.filter(pk=int(name_or_id)).first()
        if user is None:
            raise CommandError(f"No user with username or id {name_or_id!r}.")
        return user

    def _write_records(self, account: Any, limit: int) -> None:
        rows = UsageRecord.objects.filter(user=account).order_by("-created_at")[:limit]
        self.stdout.write(f"recent usage ({len(rows)}):")
        for row in rows:
            self.stdout.write(
                f"  {row.created_at:%Y-%m-%d %H:%M:%S} {row.status:<9} "
                f"estimated {row.estimated_tokens:>7} actual {row.actual_tokens:>7} "
                f"{row.model or '-'} {row.request_id}"
            )
