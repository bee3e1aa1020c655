"""URL routes of the control plane."""

from django.contrib import admin
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.urls import include, path
from django.views.defaults import page_not_found
from drf_spectacular.views import SpectacularAPIView

from agents.views import dashboard
from controlplane.gateway.errors import not_found
from controlplane.health import healthz
from controlplane.metrics import metrics_view

admin.site.site_header = "llmfleet"
admin.site.site_title = "llmfleet admin"
admin.site.index_title = "Fleet"


def api_not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """A 404 in each API's own shape: DRF's `{"detail"}` under /api/, OpenAI's under /v1/
    (its own catch-all answers most), Django's page elsewhere."""
    if request.path.startswith("/api/"):
        return JsonResponse({"detail": "Not found."}, status=404)
    if request.path.startswith("/v1/"):
        return not_found(request)
    return page_not_found(request, exception or Http404())


handler404 = api_not_found

urlpatterns = [
    path("healthz", healthz, name="healthz"),
    path("v1/", include("controlplane.gateway.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/", include("agents.api.urls")),
    path("dashboard/", dashboard, name="dashboard"),
    path("admin/", admin.site.urls),
    path("metrics", metrics_view, name="prometheus-django-metrics"),
]
