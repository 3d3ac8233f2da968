"""Budget and health endpoints. Thin: every figure comes from ``quotas.services``."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.shortcuts import get_object_or_404
from rest_framework import generics, permissions
from rest_framework.exceptions import APIException
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from quotas import services
from quotas.api.schema import AUTH_ERRORS, DetailSerializer, documented
from quotas.api.serializers import BudgetSerializer, HealthSerializer, PlanSerializer
from quotas.exceptions import ConfigurationError
from quotas.models import Plan

__all__ = ["CanViewUserQuotas", "HealthView", "MyBudgetView", "PlanListView", "UserBudgetView"]


NO_PLAN = (DetailSerializer, "No plan applies: no default plan and none assigned.")
NOT_FOUND = (DetailSerializer, "No such user.")


class NoPlan(APIException):
    status_code = 409
    default_code = "no_plan"


def _budget_response(user: Any) -> Response:
    try:
        budget = services.budget_for(user)
    except ConfigurationError as exc:
        raise NoPlan(str(exc)) from exc
    return Response(BudgetSerializer(budget).data)


class MyBudgetView(APIView):
    """``GET me/``: the caller's plan, limit, usage and reset time."""

    permission_classes = [permissions.IsAuthenticated]

    @documented(responses={200: BudgetSerializer, **AUTH_ERRORS, 409: NO_PLAN})
    def get(self, request: Request) -> Response:
        return _budget_response(request.user)


class CanViewUserQuotas(permissions.IsAdminUser):
    """Staff with the permission the admin asks to show users' quotas
    (``quotas.view_userquota``; superusers have every permission)."""

    message = "Reading another user's budget needs the 'quotas.view_userquota' permission."

    def has_permission(self, request: Request, view: Any) -> bool:
        return super().has_permission(request, view) and request.user.has_perm(
            "quotas.view_userquota"
        )


class UserBudgetView(APIView):
    """``GET users/<id>/``: any user's budget, for staff who may view user quotas in the admin
    (others get 403)."""

    permission_classes = [CanViewUserQuotas]

    @documented(responses={200: BudgetSerializer, **AUTH_ERRORS, 404: NOT_FOUND, 409: NO_PLAN})
    def get(self, request: Request, user_id: int) -> Response:
        user = get_object_or_404(get_user_model(), pk=user_id)
        return _budget_response(user)


class PlanListView(generics.ListAPIView):
    """``GET plans/``: the active plans and their public limits."""

    permission_classes = [permissions.AllowAny]
    serializer_class = PlanSerializer
    pagination_class = None

    @documented(responses={200: PlanSerializer(many=True)})
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)

    def get_queryset(self) -> Any:
        return Plan.objects.active()


class HealthView(APIView):
    """``GET health/``: Redis, the broker, the ledger's backlog; 200 when ``"ok"``, 503 when
    ``"degraded"``. Unauthenticated (for load balancers and monitors): it shows counts and
    ages, nothing about any user."""

    authentication_classes: list[Any] = []
    permission_classes = [permissions.AllowAny]
    throttle_classes: list[Any] = []

    @documented(
        responses={200: HealthSerializer, 503: (HealthSerializer, "Status degraded.")},
        auth=[],
    )
    def get(self, request: Request) -> Response:
        report = services.health()
        return Response(report, status=200 if report["status"] == "ok" else 503)
