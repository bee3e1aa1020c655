"""Who may do what through the fleet API: Django's model permissions, for reads too.

Staff status lets a person in; each call then needs the permission of what it does, so an
operator's role (a group: docs/operating.md, "Operator roles") says exactly what they can change. A
view's `action_permissions` names what its own actions need (draining an agent changes the
agent; loading a model adds a placement).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rest_framework import permissions

if TYPE_CHECKING:  # DRF imports this module while rest_framework.views loads
    from rest_framework.request import Request
    from rest_framework.views import APIView


class FleetPermissions(permissions.DjangoModelPermissions):
    perms_map = {
        "GET": ["%(app_label)s.view_%(model_name)s"],
        "HEAD": ["%(app_label)s.view_%(model_name)s"],
        "OPTIONS": ["%(app_label)s.view_%(model_name)s"],
        "POST": ["%(app_label)s.add_%(model_name)s"],
        "PUT": ["%(app_label)s.change_%(model_name)s"],
        "PATCH": ["%(app_label)s.change_%(model_name)s"],
        "DELETE": ["%(app_label)s.delete_%(model_name)s"],
    }

    def has_permission(self, request: Request, view: APIView) -> bool:
        user: Any = request.user
        if not (user and user.is_authenticated and user.is_staff):
            return False
        needed = getattr(view, "action_permissions", {}).get(getattr(view, "action", None))
        if needed is not None:
            return bool(user.has_perms(needed))
        return super().has_permission(request, view)
