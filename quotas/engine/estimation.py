"""Estimates of request bodies with the configured estimator (``QUOTAS["ESTIMATOR"]``)."""

from __future__ import annotations

from typing import Any

from django.utils.module_loading import import_string

from quotas.conf import quota_settings
from quotas.core.estimate import Estimate

__all__ = ["estimate"]


def estimate(body: Any) -> Estimate:
    """Estimate a request body with the configured estimator (``QUOTAS["ESTIMATOR"]``).

    Raises ``quotas.core.estimate.InvalidRequest`` (a ``ValueError``) naming the bad field.
    """
    estimator = import_string(quota_settings.ESTIMATOR)
    return estimator(
        body,
        fallback_encoding=quota_settings.FALLBACK_ENCODING,
        allow_download=quota_settings.ALLOW_ENCODING_DOWNLOAD,
    )
