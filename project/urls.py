"""URLs of the demo project."""

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from quotas.api.metrics import MetricsView

urlpatterns = [
    path("admin/", admin.site.urls),
    path("quotas/", include("quotas.urls")),
    # Prometheus: staff users, or the bearer token METRICS_TOKEN (see the README).
    path("metrics", MetricsView.as_view(), name="metrics"),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="swagger-ui"),
    path("", include("project.gateway.urls")),
]
