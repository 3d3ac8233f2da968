"""URLs of the app; a host mounts them with ``path("quotas/", include("quotas.urls"))``."""

from django.urls import path

from quotas.api.history import MyUsageView
from quotas.api.providers import DeferredJobView, ProviderLimitsView
from quotas.api.views import HealthView, MyBudgetView, PlanListView, UserBudgetView

app_name = "quotas"

urlpatterns = [
    path("me/", MyBudgetView.as_view(), name="me"),
    path("me/usage/", MyUsageView.as_view(), name="my-usage"),
    path("plans/", PlanListView.as_view(), name="plans"),
    path("users/<int:user_id>/", UserBudgetView.as_view(), name="user-budget"),
    path("health/", HealthView.as_view(), name="health"),
    path("jobs/<uuid:job_id>/", DeferredJobView.as_view(), name="job"),
    path("limits/", ProviderLimitsView.as_view(), name="limits"),
]
