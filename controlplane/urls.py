"""URL routes of the control plane."""

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView

from agents.views import dashboard
from controlplane.health import healthz

admin.site.site_header = "llmfleet"
admin.site.site_title = "llmfleet admin"
admin.site.index_title = "Fleet"

urlpatterns = [
    path("healthz", healthz, name="healthz"),
    path("v1/", include("controlplane.gateway.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/", include("agents.api.urls")),
    path("dashboard/", dashboard, name="dashboard"),
    path("admin/", admin.site.urls),
    path("", include("django_prometheus.urls")),
]
