"""Create the demo plans, limits, team, prices and users. Idempotent: a second run changes
nothing, and existing rows (say, a plan edited in the admin) are never overwritten.

What the demo shows off:
- free (the default): 10,000 tokens per hour and 50,000 per sliding day;
- pro: a cap on the expensive gpt-4 family (50,000 tokens per hour) and a $20 monthly cost
  budget (a calendar month in QUOTAS["TIME_ZONE"]);
- team "acme" (the demo user is in it): its plan pools 500,000 tokens per hour and 300
  requests per minute for all its members;
- a global limit: the provider's 200,000 tokens per minute for the gpt-4 family;
- prices for the usual OpenAI models (cost limits and the ledger's cost).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.base_user import AbstractBaseUser
from django.core.management.base import BaseCommand, CommandParser
from django.db import transaction
from rest_framework.authtoken.models import Token

from quotas.models import GlobalLimit, ModelPrice, Plan, PlanLimit, Team, UserQuota

DEMO_PLANS: list[dict[str, Any]] = [
    {
        "slug": "free",
        "name": "Free",
        "tier": 0,
        "tokens_per_hour": 10_000,
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
    {
        "slug": "team",
        "name": "Team pool",
        "tier": 3,
        "tokens_per_hour": 500_000,
        "max_tokens_per_request": None,
        "requests_per_minute": 300,
        "max_concurrent_requests": None,
        "default_output_tokens": 1_024,
        "is_default": False,
    },
]
# Extra limits by plan slug: (metric, period, window seconds, model glob, budget).
DEMO_LIMITS: dict[str, list[tuple[str, str, int | None, str, int]]] = {
    "free": [("tokens", "sliding", 86_400, "", 50_000)],
    "pro": [
        ("tokens", "sliding", 3_600, "gpt-4*", 50_000),
        ("cost", "month", None, "", 20_000_000),  # $20
    ],
}
DEMO_GLOBAL_LIMITS = [
    ("Provider TPM, gpt-4 family", "tokens", "sliding", 60, "gpt-4*", 200_000),
]
# US dollars per million tokens: input, output.
DEMO_PRICES = {
    "gpt-4o-mini*": ("0.15", "0.60"),
    "gpt-4o*": ("2.50", "10.00"),
    "gpt-4-turbo*": ("10.00", "30.00"),
    "gpt-4": ("30.00", "60.00"),
    "gpt-3.5-turbo*": ("0.50", "1.50"),
}
DEMO_TEAM = {"slug": "acme", "name": "Acme", "plan": "team"}
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


def seed_limits(plans: dict[str, Plan]) -> None:
    """The plans' extra limits, the global limit and the prices, once: a plan that already
    has limits (or a table that has rows) is left as the admin made it."""
    for slug, limits in DEMO_LIMITS.items():
        plan = plans[slug]
        if not plan.limits.exists():
            PlanLimit.objects.bulk_create(
                PlanLimit(plan=plan, metric=m, period=p, window_seconds=w, model=g, budget=b)
                for m, p, w, g, b in limits
            )
    if not GlobalLimit.objects.exists():
        GlobalLimit.objects.bulk_create(
            GlobalLimit(name=n, metric=m, period=p, window_seconds=w, model=g, budget=b)
            for n, m, p, w, g, b in DEMO_GLOBAL_LIMITS
        )
    if not ModelPrice.objects.exists():
        ModelPrice.objects.bulk_create(
            ModelPrice(model=model, input_per_million=Decimal(i), output_per_million=Decimal(o))
            for model, (i, o) in DEMO_PRICES.items()
        )


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
    seed_limits(plans)
    team, _ = Team.objects.get_or_create(
        slug=DEMO_TEAM["slug"], defaults={"name": DEMO_TEAM["name"], "plan": plans["team"]}
    )
    demo = ensure_user(DEMO_USERNAME, DEMO_PASSWORD)
    UserQuota.objects.get_or_create(user=demo, defaults={"plan": plans["free"], "team": team})
    ensure_user(ADMIN_USERNAME, ADMIN_PASSWORD, admin=True)
    token, _ = Token.objects.get_or_create(user=demo)
    return token


class Command(BaseCommand):
    help = (
        "Create the demo plans (free, pro, enterprise, team) with their extra limits, the "
        "acme team, a global limit, model prices, the demo user and the admin."
    )

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
            self.style.SUCCESS("Demo data ready: plans free, pro, enterprise, team.")
            + f"\n  user {DEMO_USERNAME}/{DEMO_PASSWORD} (free plan, team acme), token {token.key}"
            + f"\n  admin {ADMIN_USERNAME}/{ADMIN_PASSWORD}"
        )
