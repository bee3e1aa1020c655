"""The fleet API: agents, the model catalog, placements, and agent registration."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import exceptions, mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from agents import actions
from agents.api.authentication import (
    AgentPrincipal,
    AgentTokenAuthentication,
    IsAgent,
    bearer_token,
)
from agents.api.serializers import (
    AgentSerializer,
    LoadEventSerializer,
    LoadRequestSerializer,
    ModelSerializer,
    PlacementSerializer,
    RegisterResponseSerializer,
    RegisterSerializer,
    UnloadRequestSerializer,
)
from agents.models import Agent, Model, Placement
from nodeagent.protocol import CONTRACT_VERSION, LoadProgress, ProtocolError, RegisterResponse

# model_id may hold slashes (org/name): let the URL segment take them.
MODEL_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._:/-]*"
# A report names the few models loading on one agent: far below this.
MAX_PROGRESS_BYTES = 256 * 1024


class AgentViewSet(viewsets.ReadOnlyModelViewSet[Agent]):
    queryset = Agent.objects.prefetch_related("placements__model")
    serializer_class = AgentSerializer
    lookup_field = "agent_id"
    lookup_value_regex = r"[A-Za-z0-9][A-Za-z0-9._-]*"
    action_permissions = {"drain": ["agents.change_agent"], "undrain": ["agents.change_agent"]}

    @extend_schema(request=None, responses=AgentSerializer)
    @action(detail=True, methods=["post"])
    def drain(self, request: Request, agent_id: str) -> Response:
        """Stop sending new work to this agent."""
        self.get_object()  # 404 for an unknown agent
        return Response(AgentSerializer(actions.drain_agent(agent_id)).data)

    @extend_schema(request=None, responses=AgentSerializer)
    @action(detail=True, methods=["post"])
    def undrain(self, request: Request, agent_id: str) -> Response:
        """Let this agent take new work again."""
        self.get_object()
        return Response(AgentSerializer(actions.undrain_agent(agent_id)).data)


class ModelViewSet(viewsets.ModelViewSet[Model]):
    queryset = Model.objects.all()
    serializer_class = ModelSerializer
    lookup_field = "model_id"
    lookup_value_regex = MODEL_ID_PATTERN
    # Loading makes a placement, as a cold request would.
    action_permissions = {"load": ["agents.view_model", "agents.add_placement"]}

    @extend_schema(responses={204: None, 409: None})
    def destroy(self, request: Request, *args: object, **kwargs: object) -> Response:
        """Take the model out of the catalog and off every agent (engines stopped, files
        deleted there; its usage stays). 409 while LoRA adapters name it as their base."""
        model = self.get_object()
        try:
            actions.delete_model(model.model_id)
        except actions.ModelInUse as exc:
            return Response({"detail": str(exc)}, status=status.HTTP_409_CONFLICT)
        except Model.DoesNotExist:  # deleted meanwhile
            pass
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(request=LoadRequestSerializer, responses={202: PlacementSerializer})
    @action(detail=True, methods=["post"])
    def load(self, request: Request, model_id: str) -> Response:
        """Load the model: onto `agent` when given, else where it can serve soonest (as a
        cold request would). 202 with the placement; 409 when no agent can take it."""
        model = self.get_object()
        serializer = LoadRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        agent_id = serializer.validated_data.get("agent")
        try:
            if agent_id:
                agent = get_object_or_404(Agent, agent_id=agent_id)
                placement = actions.load_on_agent(model, agent)
            else:
                placement = actions.ensure_placement(model)
        except actions.NoCapacity as exc:
            return Response({"detail": str(exc)}, status=status.HTTP_409_CONFLICT)
        return Response(PlacementSerializer(placement).data, status=status.HTTP_202_ACCEPTED)


@extend_schema(
    parameters=[
        OpenApiParameter("model", str, description="Only placements of this model_id"),
        OpenApiParameter("agent", str, description="Only placements on this agent_id"),
        OpenApiParameter("state", str, description="Only placements in this state"),
        OpenApiParameter("cache_level", str, description="Only placements at this level"),
    ]
)
class PlacementViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet[Placement]
):
    serializer_class = PlacementSerializer
    action_permissions = {"unload": ["agents.change_placement"]}

    def get_queryset(self) -> QuerySet[Placement]:
        queryset = Placement.objects.select_related("agent", "model")
        filters = {
            "model": "model__model_id",
            "agent": "agent__agent_id",
            "state": "state",
            "cache_level": "cache_level",
        }
        for param, lookup in filters.items():
            value = self.request.query_params.get(param)
            if value and "\x00" in value:  # PostgreSQL refuses NUL in text: a 400, not a 500
                raise serializers.ValidationError({param: ["Null characters are not allowed."]})
            if value:
                queryset = queryset.filter(**{lookup: value})
        return queryset

    @extend_schema(request=UnloadRequestSerializer, responses={202: LoadEventSerializer})
    @action(detail=True, methods=["post"])
    def unload(self, request: Request, pk: str) -> Response:
        """Step the placement down to `to` (DRAM_CACHED, NVME_CACHED or NONE). 202 with the
        LoadEvent that records it; 409 while it loads or when it is not above that level."""
        placement = self.get_object()
        serializer = UnloadRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        try:
            event = actions.unload(placement, serializer.validated_data["to"])
        except actions.CannotStepDown as exc:
            return Response({"detail": str(exc)}, status=status.HTTP_409_CONFLICT)
        return Response(LoadEventSerializer(event).data, status=status.HTTP_202_ACCEPTED)


class RegisterAgentView(APIView):
    """`POST /api/agents/register`: a node agent announces itself (idempotent by agent_id)."""

    authentication_classes = [AgentTokenAuthentication]
    permission_classes = [IsAgent]

    @extend_schema(request=RegisterSerializer, responses=RegisterResponseSerializer)
    def post(self, request: Request) -> Response:
        serializer = RegisterSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        principal = request.user
        assert isinstance(principal, AgentPrincipal)
        try:
            registration = actions.register_agent(
                serializer.to_request(), speaking_as=principal.agent_id
            )
        except actions.RegistrationRefused as exc:
            return Response({"detail": str(exc)}, status=exc.status)
        agent, created = registration.agent, registration.created
        answer = RegisterResponse(
            agent_id=agent.agent_id,
            created=created,
            state=agent.state,
            heartbeat_interval_seconds=settings.HEARTBEAT_INTERVAL_SECONDS,
            credential=registration.credential,
            contract=CONTRACT_VERSION,
        )
        body = {key: value for key, value in asdict(answer).items() if value != ""}
        return Response(body, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)


@csrf_exempt
async def agent_progress(request: HttpRequest, agent_id: str) -> HttpResponse:
    """`POST /api/agents/<agent_id>/progress`: an agent's loads, phase by phase, as they
    happen (nodeagent.progress). Only the agent itself may report: its own credential.

    Off the thread Django runs sync views in under ASGI: that one thread also serves the
    gateway's cold-start decisions, which must not queue behind a fleet's progress reports.
    """
    if request.method != "POST":
        return JsonResponse({"detail": "Use POST."}, status=405, headers={"Allow": "POST"})
    return await sync_to_async(_agent_progress, thread_sensitive=False)(request, agent_id)


@csrf_exempt
async def confirm_credential(request: HttpRequest, agent_id: str) -> HttpResponse:
    """`POST /api/agents/<agent_id>/credential/confirm` with `Authorization: Bearer <new>`:
    what an agent asks before it keeps a credential a rotation hands it. 204 when it is the
    one this control plane is issuing to that agent, 403 otherwise (a caller holding the
    agent's current credential cannot rotate it to one of its own). With the body
    `{"revocation": true}` and the agent's own credential: whether this control plane revoked
    it (before the agent forgets it: a caller holding it cannot lock the agent out).

    Off the thread Django runs sync views in: the rotation that causes this call may be an
    admin action waiting in that thread for the agent's answer."""
    if request.method != "POST":
        return JsonResponse({"detail": "Use POST."}, status=405, headers={"Allow": "POST"})
    token = bearer_token(request.headers.get("Authorization", "")) or ""
    asked: Any = {}
    if request.content_type == "application/json" and request.body:
        try:
            asked = json.loads(request.body)
        except ValueError:
            asked = None
    if not isinstance(asked, dict) or not isinstance(asked.get("revocation", False), bool):
        return JsonResponse(
            {"detail": 'The body is {"revocation": true|false} or none.'}, status=400
        )
    revocation = asked.get("revocation", False)
    confirmed = await sync_to_async(_confirm, thread_sensitive=False)(agent_id, token, revocation)
    if not confirmed:
        return JsonResponse(
            {"detail": "Not a credential this control plane is issuing to that agent."},
            status=403,
        )
    return HttpResponse(status=204)


def _confirm(agent_id: str, token: str, revocation: bool) -> bool:
    try:
        return actions.confirm_credential(agent_id, token, revocation=revocation)
    finally:
        connection.close()  # a thread of the pool, not a request's


def _unauthenticated(detail: str) -> HttpResponse:
    challenge = AgentTokenAuthentication().authenticate_header(None)  # type: ignore[arg-type]
    return JsonResponse({"detail": detail}, status=401, headers={"WWW-Authenticate": challenge})


def _agent_progress(request: HttpRequest, agent_id: str) -> HttpResponse:
    try:
        try:
            found = AgentTokenAuthentication().authenticate(Request(request))
        except exceptions.AuthenticationFailed as exc:
            return _unauthenticated(str(exc.detail))
        if found is None:
            return _unauthenticated("Authentication credentials were not provided.")
        principal, _ = found
        if principal.agent_id != agent_id:
            return JsonResponse(
                {"detail": "Only the agent itself reports its progress, with its credential."},
                status=403,
            )
        if len(request.body) > MAX_PROGRESS_BYTES:
            return JsonResponse(
                {"detail": f"A progress report is limited to {MAX_PROGRESS_BYTES} bytes."},
                status=413,
            )
        try:
            report = LoadProgress.from_json(request.body)
        except ProtocolError as exc:
            return JsonResponse({"detail": str(exc)}, status=400)
        if report.agent_id != agent_id:
            return JsonResponse(
                {"detail": f"The report is of agent {report.agent_id!r}, not {agent_id!r}."},
                status=400,
            )
        agent = Agent.objects.filter(agent_id=agent_id).first()
        if agent is None:
            return JsonResponse({"detail": f"No agent {agent_id!r}."}, status=404)
        actions.record_progress(agent, report.models)
        return HttpResponse(status=204)
    finally:
        # A thread of the pool, not a request's: its connection is not closed for it.
        connection.close()
