from django.urls import path
from rest_framework.routers import DefaultRouter

from agents.api.views import AgentViewSet, ModelViewSet, PlacementViewSet, RegisterAgentView

router = DefaultRouter()
router.register("agents", AgentViewSet)
router.register("models", ModelViewSet)
router.register("placements", PlacementViewSet, basename="placement")

urlpatterns = [
    # Before the router, so "register" is not taken for an agent_id.
    path("agents/register", RegisterAgentView.as_view(), name="agent-register"),
    *router.urls,
]
