"""Per-user LLM token quotas for Django.

The package root exports only framework-free names; import Django integrations from their
modules (``quotas.services``, ``quotas.throttling``, ``quotas.middleware``, ``quotas.llm``).
``quotas.track`` (``quotas.llm.track``) is the one exception, loaded on first use (it needs
Django configured), so that importing ``quotas`` never imports Django.
"""

from typing import Any

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


def __getattr__(name: str) -> Any:
    # PEP 562: ``quotas.track`` without importing Django (and the SDK) with the package.
    if name in ("track", "atrack"):
        from quotas import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'quotas' has no attribute {name!r}")
