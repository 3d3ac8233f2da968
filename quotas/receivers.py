"""Keep the limits cached in Redis in step with the database.

A saved or deleted plan or user quota drops the cached limits after the transaction commits,
so the next request of every affected user, in every process, reloads them.
"""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from quotas.models import Plan, UserQuota
from quotas.services import forget_limits_of


@receiver([post_save, post_delete], sender=Plan, dispatch_uid="quotas_plan_changed")
def plan_changed(sender: type[Plan], instance: Plan, **kwargs: Any) -> None:
    # A plan reaches users through UserQuota rows and, as the default, through users with
    # no row at all, who cannot be listed: drop every cached config.
    transaction.on_commit(lambda: forget_limits_of(None))


@receiver([post_save, post_delete], sender=UserQuota, dispatch_uid="quotas_userquota_changed")
def user_quota_changed(sender: type[UserQuota], instance: UserQuota, **kwargs: Any) -> None:
    user_id = instance.user_id
    transaction.on_commit(lambda: forget_limits_of([user_id]))
