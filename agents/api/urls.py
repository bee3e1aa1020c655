from django.urls import path
from rest_framework.routers import DefaultRouter, DynamicRoute, Route

from agents.api.views import (
    AgentViewSet,
    ModelViewSet,
    PlacementViewSet,
    RegisterAgentView,
    agent_progress,
    confirm_credential,
)


def _detail_actions_first(routes: list[Route | DynamicRoute]) -> list[Route | DynamicRoute]:
    """The same routes with the detail actions moved before the detail route. The list route
    stays first: DefaultRouter's API root reads its name from routes[0]."""
    detail_actions = [r for r in routes if isinstance(r, DynamicRoute) and r.detail]
    detail = next(r for r in routes if isinstance(r, Route) and r.detail)
    others = [r for r in routes if r not in detail_actions]
    at = others.index(detail)
    return others[:at] + detail_actions + others[at:]


class FleetRouter(DefaultRouter):
    """Actions on an object (`/models/org/name/load/`) are matched before the object itself:
    a model_id may hold slashes, so the detail route would take `org/name/load` for an id."""

    routes = _detail_actions_first(DefaultRouter.routes)


router = FleetRouter()
router.register("agents", AgentViewSet)
router.register("models", ModelViewSet)
router.register("placements", PlacementViewSet, basename="placement")

urlpatterns = [
    # Before the router, so "register" is not taken for an agent_id.
    path("agents/register", RegisterAgentView.as_view(), name="agent-register"),
    path("agents/<str:agent_id>/progress", agent_progress, name="agent-progress"),
    path(
        "agents/<str:agent_id>/credential/confirm",
        confirm_credential,
        name="agent-credential-confirm",
    ),
    *router.urls,
]
