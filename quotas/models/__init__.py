"""Plans, teams, per-user quotas, extra and global limits, prices, and the usage ledger.

The ledger (``UsageRecord``) is the source of truth: Redis windows can be rebuilt from it.
"""

from quotas.models.jobs import DeferredJob
from quotas.models.ledger import UsageRecord
from quotas.models.limits import (
    ConfigRevision,
    GlobalLimit,
    LimitFields,
    ModelPrice,
    PlanLimit,
)
from quotas.models.plans import (
    MAX_BUDGET,
    MODEL_NAME_MAX,
    Plan,
    PlanQuerySet,
    Team,
    UserQuota,
    fallback_models_problem,
)
from quotas.models.rollups import Dashboard, UsageRollup

__all__ = [
    "MAX_BUDGET",
    "MODEL_NAME_MAX",
    "ConfigRevision",
    "Dashboard",
    "DeferredJob",
    "GlobalLimit",
    "LimitFields",
    "ModelPrice",
    "Plan",
    "PlanLimit",
    "PlanQuerySet",
    "Team",
    "UsageRecord",
    "UsageRollup",
    "UserQuota",
    "fallback_models_problem",
]
