"""Who a request counts against, and which limits apply to it (see ``quotas.engine.config``):
read from the database once per user and config version, not on every request."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TypeAlias

from django.contrib.auth.base_user import AbstractBaseUser
from django.contrib.auth.models import AnonymousUser
from django.db import transaction

from quotas.core.types import Limits
from quotas.engine.config import (
    QuotaConfig,
    anonymous_config,
    config_changed,
    configs,
    user_config,
)
from quotas.exceptions import ConfigurationError
from quotas.models import Plan, UserQuota

__all__ = [
    "User",
    "config_for",
    "forget_limits_of",
    "limits_for",
    "move_to_plan",
    "scope_for",
    "user_id_of",
]

logger = logging.getLogger("quotas")

User: TypeAlias = AbstractBaseUser | AnonymousUser


def scope_for(user: User | None, client_address: str | None = None) -> str:
    """The quota key: the user's primary key, or ``anon-<address>`` for anonymous clients."""
    if user is not None and user.is_authenticated:
        return str(user.pk)
    if not client_address:
        raise ConfigurationError("An anonymous request needs a client address for its quota.")
    # A quota key never holds "/": a reservation id is "<quota key>/<request id>" (an IPv6
    # client's key is its /64 network, "2001:db8::/64", which becomes "2001:db8::_64").
    return f"anon-{client_address.replace('/', '_')}"


def config_for(user: User | None, client_address: str | None = None) -> QuotaConfig:
    """Every limit that applies to this user (or anonymous client): from this process's
    memory, or the database when the config version changed since it was read.

    Raises ``ConfigurationError`` when no plan applies (never a silent "unlimited").
    """
    scope = scope_for(user, client_address)
    cache = configs()
    config = cache.get(scope)
    if config is None:
        version = cache.current_version()  # read before the database, so never newer
        config = replace(_read_config(user), version=version)
        if version == cache.version:
            cache.put(scope, config)
    return config


def _read_config(user: User | None) -> QuotaConfig:
    if user is None or not user.is_authenticated:
        return anonymous_config()
    return user_config(user.pk)


def limits_for(user: User | None, client_address: str | None = None) -> Limits:
    """The plan's own limits for this user: their override, else their plan, else the
    default plan (``QuotaConfig.limits``)."""
    return config_for(user, client_address).limits


def user_id_of(user: User | None) -> int | None:
    """The user's primary key, ``None`` for an anonymous client."""
    return user.pk if user is not None and user.is_authenticated else None


def forget_limits_of(user_ids: list[int] | None = None) -> None:
    """Make every process reload the limits it holds (a plan or quota changed)."""
    config_changed()


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
        transaction.on_commit(config_changed)
    return len(user_ids)
