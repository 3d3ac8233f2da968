"""Keep every process's limits in step with the database.

Saving or deleting anything limits are made of (a plan, a plan's extra limit, a team, a user
quota, a global limit, a model price) bumps the config version once the transaction commits,
so every process reloads the limits on its next decision (see ``quotas.engine.config``).
Queryset ``update()`` and ``bulk_create()`` send no signals: call
``quotas.services.config_changed()`` after them (``move_to_plan`` does).
"""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from quotas.models import GlobalLimit, ModelPrice, Plan, PlanLimit, Team, UserQuota
from quotas.services import config_changed

CONFIG_MODELS = (Plan, PlanLimit, Team, UserQuota, GlobalLimit, ModelPrice)


@receiver([post_save, post_delete], dispatch_uid="quotas_config_changed")
def limits_changed(sender: type, **kwargs: Any) -> None:
    """One of the models limits are made of changed: every process reloads after commit."""
    if sender in CONFIG_MODELS:
        transaction.on_commit(config_changed)
