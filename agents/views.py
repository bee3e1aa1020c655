"""The live dashboard page; its data comes over the WebSocket (controlplane.dashboard)."""

from __future__ import annotations

from django.contrib.admin.views.decorators import staff_member_required
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

# What the dashboard shows is the fleet's agents and what they serve: the read-only role's.
DASHBOARD_PERMISSION = "agents.view_agent"


@staff_member_required
def dashboard(request: HttpRequest) -> HttpResponse:
    if not request.user.has_perm(DASHBOARD_PERMISSION):
        raise PermissionDenied("The dashboard needs the permission to view agents.")
    return render(request, "dashboard.html", {"title": "Fleet dashboard"})
