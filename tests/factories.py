"""factory_boy factories for the fleet's rows."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from factory.declarations import LazyAttribute, Sequence, SubFactory
from factory.django import DjangoModelFactory

from agents import credentials
from agents.choices import AgentState, CacheLevel, LoadEventKind, LoadTrigger, PlacementState
from agents.models import Agent, LoadEvent, Model, Placement
from controlplane.gateway.actions import create_api_key
from controlplane.gateway.models import ApiKey

GIB = 1024**3


class AgentFactory(DjangoModelFactory[Agent]):
    class Meta:
        model = Agent

    agent_id = Sequence(lambda n: f"gpu-host-{n}")
    base_url = LazyAttribute(lambda agent: f"http://{agent.agent_id}.internal:8100")
    state = AgentState.IDLE
    reported_state = AgentState.IDLE
    gpu_name = "NVIDIA H100 80GB HBM3"
    gpu_count = 1
    gpu_memory_total = 80 * GIB
    gpu_memory_free = 60 * GIB
    # Enrolled: a credential the control plane can call it with (agents.credentials).
    credential_nonce = Sequence(lambda n: f"{n:064x}")
    credential_fingerprint = LazyAttribute(
        lambda agent: credentials.fingerprint(credentials.derive(agent.agent_id,
                                                                 agent.credential_nonce))
    )  # fmt: skip


class ModelFactory(DjangoModelFactory[Model]):
    class Meta:
        model = Model

    model_id = Sequence(lambda n: f"org/model-{n}")
    source = LazyAttribute(lambda model: f"azure://models/{model.model_id}")
    size_bytes = 2 * GIB
    gpu_memory_bytes = 4 * GIB


class PlacementFactory(DjangoModelFactory[Placement]):
    class Meta:
        model = Placement

    agent = SubFactory(AgentFactory)
    model = SubFactory(ModelFactory)
    state = PlacementState.READY
    cache_level = CacheLevel.GPU_RESIDENT
    inference_endpoint_url = LazyAttribute(
        lambda placement: f"{placement.agent.base_url}/models/{placement.model.model_id}"
    )


class LoadEventFactory(DjangoModelFactory[LoadEvent]):
    class Meta:
        model = LoadEvent

    agent = SubFactory(AgentFactory)
    model = SubFactory(ModelFactory)
    kind = LoadEventKind.LOAD
    trigger = LoadTrigger.REQUEST
    from_level = CacheLevel.NONE
    to_level = CacheLevel.GPU_RESIDENT


def make_api_key(
    name: str = "app", model_ids: tuple[str, ...] = (), **limits: Any
) -> tuple[ApiKey, str]:
    return create_api_key(name, model_ids, **limits)


def ensure_roles() -> None:
    """The role groups, as their migration makes them: a transactional test's flush empties
    every table, the migration's rows with it."""
    import importlib

    from django.apps import apps

    roles = importlib.import_module("agents.migrations.0012_operator_roles")
    roles.create_roles(apps, None)


def make_role_user(username: str, role: str | None = None, *perms: str) -> Any:
    """A staff user (not a superuser) in the group `role`, with `perms` ("app.codename")."""
    from django.contrib.auth.models import Group, Permission

    if role is not None and not Group.objects.filter(name=role).exists():
        ensure_roles()

    user = get_user_model().objects.create_user(
        username=username, password="correct horse battery staple", is_staff=True
    )
    if role is not None:
        user.groups.add(Group.objects.get(name=role))
    for perm in perms:
        app_label, codename = perm.split(".")
        user.user_permissions.add(
            Permission.objects.get(content_type__app_label=app_label, codename=codename)
        )
    return user


def make_staff_user(username: str = "operator") -> Any:
    return get_user_model().objects.create_user(
        username=username, password="correct horse battery staple", is_staff=True, is_superuser=True
    )
