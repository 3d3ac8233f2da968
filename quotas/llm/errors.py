"""What the quota-aware client raises besides the SDK's own errors.

``ProviderRefused`` is a ``QuotaExceeded`` (``scope`` ``"provider"``): the HTTP layer answers
it as a 429 with its exact ``Retry-After``, as it answers the user's own limits.
"""

from __future__ import annotations

from quotas.exceptions import QuotaError, QuotaExceeded

__all__ = ["Deferred", "ProviderRefused", "ProviderUnavailable", "RungRefused"]


class ProviderRefused(QuotaExceeded):
    """The provider's own limits (learned from its headers and 429s) hold the call back for
    longer than the caller may wait: retry after ``retry_after`` seconds."""

    def __init__(
        self, *, provider: str, model: str, reason: str, retry_after: float, requested: int
    ) -> None:
        super().__init__(
            limit=0,
            remaining=0,
            requested=requested,
            retry_after=retry_after,
            scope="provider",
            limit_scope="provider",
            model=model,
        )
        self.provider = provider
        self.reason = reason
        self.args = (
            f"The provider {provider!r} cannot take a call to {model!r} now ({reason}); "
            f"retry after {retry_after:.3f}s.",
        )


class ProviderUnavailable(QuotaError):
    """The circuit breaker of this provider and model is open (it stopped answering): the
    call fails at once instead of waiting for a timeout. Try again after ``retry_after``."""

    def __init__(self, *, provider: str, model: str, retry_after: float) -> None:
        self.provider = provider
        self.model = model
        self.retry_after = retry_after
        super().__init__(
            f"The provider {provider!r} is not answering for {model!r} (circuit open); "
            f"retry after {retry_after:.3f}s."
        )


class Deferred(QuotaError):
    """The request could not be served now and was queued as a job (the last rung of the
    plan's ladder): its owner reads the answer at ``GET /quotas/jobs/<job_id>/`` once it ran,
    no sooner than ``retry_after`` seconds from now."""

    rung = "deferred"

    def __init__(self, *, job_id: str, retry_after: float) -> None:
        self.job_id = job_id
        self.retry_after = retry_after
        super().__init__(f"The request was queued as job {job_id}; retry after {retry_after:.0f}s.")


class RungRefused(Exception):
    """One rung of a ladder refused; ``error`` is what the caller gets if no rung below
    serves (the user's ``QuotaExceeded``, a ``ProviderRefused``, a ``ProviderUnavailable``,
    the SDK's ``RateLimitError``...)."""

    def __init__(self, error: BaseException, retry_after: float) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after
