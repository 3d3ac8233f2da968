"""Per-user LLM token quotas for Django.

The package root exports only framework-free names; import Django integrations from their
modules (``quotas.services``, ``quotas.throttling``, ``quotas.middleware``).
"""

from quotas.exceptions import (
    ConfigurationError,
    QuotaError,
    QuotaExceeded,
    RequestTooLarge,
    StoreUnavailable,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigurationError",
    "QuotaError",
    "QuotaExceeded",
    "RequestTooLarge",
    "StoreUnavailable",
    "__version__",
]
