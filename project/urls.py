"""URLs of the demo project."""

from django.contrib import admin
from django.urls import include, path

from quotas.api.metrics import MetricsView

urlpatterns = [
    path("admin/", admin.site.urls),
    path("quotas/", include("quotas.urls")),
    # Prometheus: staff users, or the bearer token METRICS_TOKEN (see the README).
    path("metrics", MetricsView.as_view(), name="metrics"),
    path("", include("project.gateway.urls")),
]
