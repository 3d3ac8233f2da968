"""Who a request counts against, and which limits apply: plans, per-user overrides, the
anonymous plan. Limits are read from the database only when Redis does not hold them (the
first request of a user, or after a plan or quota changed)."""

from __future__ import annotations

import logging
from typing import TypeAlias

from django.contrib.auth.base_user import AbstractBaseUser
from django.contrib.auth.models import AnonymousUser
from django.db import transaction

from quotas.conf import quota_settings
from quotas.core.types import Limits
from quotas.engine.runtime import get_store
from quotas.exceptions import ConfigurationError, StoreUnavailable
from quotas.models import Plan, UserQuota

__all__ = ["User", "forget_limits_of", "limits_for", "move_to_plan", "scope_for", "user_id_of"]

logger = logging.getLogger("quotas")

User: TypeAlias = AbstractBaseUser | AnonymousUser


def scope_for(user: User | None, client_address: str | None = None) -> str:
    """The quota key: the user's primary key, or ``anon-<address>`` for anonymous clients."""
    if user is not None and user.is_authenticated:
        return str(user.pk)
    if not client_address:
        raise ConfigurationError("An anonymous request needs a client address for its quota.")
    return f"anon-{client_address}"


def _limits_from_plan(plan: Plan, override: int | None = None) -> Limits:
    return Limits(
        tokens_per_window=override or plan.tokens_per_hour,
        plan_slug=plan.slug,
        plan_name=plan.name,
        max_tokens_per_request=plan.max_tokens_per_request,
        requests_per_minute=plan.requests_per_minute,
        max_concurrent_requests=plan.max_concurrent_requests,
        default_output_tokens=plan.default_output_tokens,
    )


def limits_for(user: User | None) -> Limits:
    """Effective limits: the user's override, else their plan, else the default plan.

    Raises ``ConfigurationError`` when no plan applies (never a silent "unlimited").
    """
    if user is None or not user.is_authenticated:
        return _anonymous_limits()
    quota = UserQuota.objects.select_related("plan").filter(user_id=user.pk).first()
    plan = quota.plan if quota and quota.plan and quota.plan.is_active else None
    plan = plan or Plan.objects.filter(is_default=True, is_active=True).first()
    if plan is None:
        raise ConfigurationError(
            f"User {user.pk} has no plan and no default plan is set: mark one active plan "
            "as the default, or give the user a plan."
        )
    return _limits_from_plan(plan, quota.tokens_per_hour_override if quota else None)


def _anonymous_limits() -> Limits:
    slug = quota_settings.ANONYMOUS_PLAN
    plan = Plan.objects.filter(slug=slug, is_active=True).first() if slug else None
    if plan is None:
        raise ConfigurationError(f"QUOTAS['ANONYMOUS_PLAN'] names no active plan ({slug!r}).")
    return _limits_from_plan(plan)


def user_id_of(user: User | None) -> int | None:
    return user.pk if user is not None and user.is_authenticated else None


def forget_limits_of(user_ids: list[int] | None) -> None:
    """Make the next request of these users (all users when ``None``) reload their limits."""
    try:
        store = get_store()
        if user_ids is None:
            store.forget_all_limits()
        else:
            store.forget_limits([str(pk) for pk in user_ids])
    except StoreUnavailable:
        logger.warning("quotas: Redis unavailable; limits will reload when their keys expire")


def move_to_plan(user_ids: list[int], plan: Plan) -> int:
    """Put these users on ``plan`` (admin action); their next request uses it."""
    with transaction.atomic():
        existing = set(
            UserQuota.objects.filter(user_id__in=user_ids).values_list("user_id", flat=True)
        )
        UserQuota.objects.filter(user_id__in=existing).update(plan=plan)
        UserQuota.objects.bulk_create(
            [UserQuota(user_id=pk, plan=plan) for pk in user_ids if pk not in existing]
        )
        # Bulk updates send no signals: drop the cached limits ourselves, after commit.
        transaction.on_commit(lambda: forget_limits_of(list(user_ids)))
    return len(user_ids)
