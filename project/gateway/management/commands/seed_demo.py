"""Create the demo plans and users. Idempotent: a second run changes nothing, and existing
rows (say, a plan edited in the admin) are never overwritten."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.base_user import AbstractBaseUser
from django.core.management.base import BaseCommand, CommandParser
from django.db import transaction
from rest_framework.authtoken.models import Token

from quotas.models import Plan, UserQuota

DEMO_PLANS: list[dict[str, Any]] = [
    {
        "slug": "free",
        "name": "Free",
        "tier": 0,
        "tokens_per_hour": 20_000,
        "max_tokens_per_request": 4_000,
        "requests_per_minute": 20,
        "max_concurrent_requests": 2,
        # Above the fake model's answer (GATEWAY_FAKE_ANSWER_TOKENS, 300): a request without
        # max_tokens is refunded the difference instead of ending in debt.
        "default_output_tokens": 512,
        "is_default": True,
        # With an upstream and X-Quota-Degrade: allow: a cheaper model, then the cache
        # (free hits), then a deferred job.
        "fallback_models": ["gpt-4o-mini"],
        "serve_from_cache": True,
        "defer_when_refused": True,
    },
    {
        "slug": "pro",
        "name": "Pro",
        "tier": 1,
        "tokens_per_hour": 200_000,
        "max_tokens_per_request": 16_000,
        "requests_per_minute": 120,
        "max_concurrent_requests": 8,
        "default_output_tokens": 1_024,
        "is_default": False,
    },
    {
        "slug": "enterprise",
        "name": "Enterprise",
        "tier": 2,
        "tokens_per_hour": 2_000_000,
        "max_tokens_per_request": 64_000,
        "requests_per_minute": None,
        "max_concurrent_requests": None,
        "default_output_tokens": 4_096,
        "is_default": False,
    },
]
DEMO_USERNAME = "demo"
DEMO_PASSWORD = "demo"
ADMIN_USERNAME = "admin"
ADMIN_PASSWORD = "admin"


def seed_plans() -> dict[str, Plan]:
    """Create the demo plans that do not exist yet; return all of them by slug."""
    plans = {}
    for spec in DEMO_PLANS:
        defaults = {key: value for key, value in spec.items() if key != "slug"}
        plans[spec["slug"]], _ = Plan.objects.get_or_create(
            slug=spec["slug"], defaults={**defaults, "is_active": True}
        )
    return plans


def ensure_user(username: str, password: str, *, admin: bool = False) -> AbstractBaseUser:
    """Return the user ``username``, creating it with ``password`` if it does not exist."""
    user_model = get_user_model()
    user = user_model.objects.filter(username=username).first()
    if user is not None:
        return user
    if admin:
        return user_model.objects.create_superuser(username, f"{username}@example.com", password)
    return user_model.objects.create_user(username, f"{username}@example.com", password)


@transaction.atomic
def seed_demo() -> Token:
    """Create the plans, the demo user (free plan) and the admin; return the demo's token."""
    plans = seed_plans()
    demo = ensure_user(DEMO_USERNAME, DEMO_PASSWORD)
    UserQuota.objects.get_or_create(user=demo, defaults={"plan": plans["free"]})
    ensure_user(ADMIN_USERNAME, ADMIN_PASSWORD, admin=True)
    token, _ = Token.objects.get_or_create(user=demo)
    return token


class Command(BaseCommand):
    help = "Create the demo plans (free, pro, enterprise), the demo user and the admin."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--print-token", action="store_true", help="Print only the demo user's API token."
        )

    def handle(self, *args: Any, print_token: bool = False, **options: Any) -> None:
        token = seed_demo()
        if print_token:
            self.stdout.write(token.key)
            return
        self.stdout.write(
            self.style.SUCCESS("Demo data ready: plans free, pro, enterprise.")
            + f"\n  user {DEMO_USERNAME}/{DEMO_PASSWORD} (free plan), token {token.key}"
            + f"\n  admin {ADMIN_USERNAME}/{ADMIN_PASSWORD}"
        )
