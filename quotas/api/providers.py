"""The provider side's endpoints: a deferred job for its owner, and the providers' learned
state for staff. Thin: every figure comes from ``quotas.services``."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any
from uuid import UUID

from django.http import Http404
from django.utils import timezone
from rest_framework import permissions
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from quotas import services
from quotas.api.schema import AUTH_ERRORS, DetailSerializer, documented
from quotas.api.serializers import DeferredJobSerializer, ProviderLimitsSerializer
from quotas.exceptions import StoreUnavailable

__all__ = ["DeferredJobView", "ProviderLimitsView"]


class DeferredJobView(APIView):
    """``GET jobs/<id>/``: a deferred job's status and, once it ran, its answer. Only its
    owner sees it; anyone else gets 404, as for a job that does not exist."""

    permission_classes = [permissions.IsAuthenticated]

    @documented(
        responses={
            200: DeferredJobSerializer,
            **AUTH_ERRORS,
            404: (DetailSerializer, "No such job, or not the caller's."),
        }
    )
    def get(self, request: Request, job_id: UUID) -> Response:
        job = services.job_for_owner(request.user, job_id)
        if job is None:
            raise Http404("No such job.")
        body: dict[str, Any] = {
            "id": str(job.id),
            "object": "quota.deferred_job",
            "status": job.status,
            "model": job.model or None,
            "created_at": job.created_at,
            "finished_at": job.finished_at,
            "attempts": job.attempts,
            "result": job.result,
            "error": job.error or None,
        }
        if job.status in ("queued", "running"):
            body["retry_after_seconds"] = _seconds_until(job.run_after)
        return Response(body)


def _seconds_until(moment: Any) -> int:
    if moment is None:
        return 1
    return max(int((moment - timezone.now()).total_seconds() + 0.999), 1)


class ProviderLimitsView(APIView):
    """``GET limits/`` (staff): each provider key and model's learned state (its limits and
    what is left of them, the adaptive rate, the mode), its circuit breaker, and calls in
    flight, as every process sees them. 503 while Redis is unavailable."""

    permission_classes = [permissions.IsAdminUser]

    @documented(
        responses={
            200: ProviderLimitsSerializer,
            **AUTH_ERRORS,
            503: (ProviderLimitsSerializer, "Redis unavailable."),
        }
    )
    def get(self, request: Request) -> Response:
        try:
            states = services.provider_states()
        except StoreUnavailable:
            return Response({"providers": None, "detail": "Redis unavailable."}, status=503)
        return Response({"providers": [asdict(state) for state in states]})
