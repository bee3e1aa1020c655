"""The model catalog: adding, updating and deleting the models clients may ask for."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import timedelta

from django.core.exceptions import ValidationError
from django.db import transaction

from agents.actions import steps
from agents.choices import CacheLevel, PlacementState
from agents.models import Agent, Model, Placement
from nodeagent.protocol import SourceSpec

log = logging.getLogger(__name__)


def register_catalog_model(
    model_id: str,
    source: str,
    *,
    size_bytes: int,
    revision: str = "",
    kind: str | None = None,
    engine_args: list[str] | None = None,
    gpu_memory_bytes: int | None = None,
    keep_alive: timedelta | None = None,
    max_keep_alive: timedelta | None = None,
    min_replicas: int | None = None,
    max_replicas: int | None = None,
    pinned: bool | None = None,
    enabled: bool = True,
    base: str | None = None,
    adapter_rank: int | None = None,
    max_loras: int | None = None,
    source_labels: dict[str, str] | None = None,
    mirrors: Sequence[SourceSpec] = (),
    manifest: str = "",
) -> tuple[Model, bool]:
    """Add a published model to the catalog, or update its entry; returns it and whether it is new.

    `source_labels` say where `source` is; `mirrors` are more stores holding the same
    published model (the caller checked their manifests agree), replacing any there were;
    `manifest` is that manifest's identity, which agents hold every source to.
    `base` (a catalog model_id) and `adapter_rank` make it a LoRA adapter of that model.
    Options left as None keep their current (or default) values. Raises ValidationError
    (writing nothing) for an invalid id, source or replica bounds, or an adapter whose base
    is not in the catalog or cannot take its rank.
    """
    with transaction.atomic():
        model = (
            Model.objects.select_for_update(no_key=True, of=("self",))
            .filter(model_id=model_id)
            .first()
        )
        created = model is None
        model = model or Model(model_id=model_id)
        model.source, model.revision, model.size_bytes, model.enabled = (
            source,
            revision,
            size_bytes,
            enabled,
        )
        options = {
            "kind": kind,
            "engine_args": engine_args,
            "gpu_memory_bytes": gpu_memory_bytes,
            "keep_alive": keep_alive,
            "max_keep_alive": max_keep_alive,
            "min_replicas": min_replicas,
            "max_replicas": max_replicas,
            "pinned": pinned,
        }
        model.source_labels, model.manifest = dict(source_labels or {}), manifest
        model.mirrors = [{"uri": m.uri, "labels": dict(m.labels)} for m in mirrors]
        for name, value in options.items():
            if value is not None:
                setattr(model, name, value)
        if max_loras is not None:
            model.max_loras = max_loras
        if base is not None:
            found = Model.objects.filter(model_id=base).first()
            if found is None:
                raise ValidationError({"base": f"The base model `{base}` is not in the catalog."})
            model.base = found
        if adapter_rank is not None:
            model.adapter_rank = adapter_rank
        model.full_clean()
        model.save()
    return model, created


class ModelInUse(Exception):
    """The model cannot be deleted now: LoRA adapters in the catalog name it as their base."""


def delete_model(model_id: str) -> None:
    """Take a model out of the catalog and off every agent: its engines stop and its files are
    deleted there (`unload_orphan`, to NONE), an adapter is unloaded from the engines holding
    it, and its placements and load history go with the row. Usage names the model and stays.
    Raises ModelInUse, deleting nothing, while adapters depend on it; Model.DoesNotExist for
    an unknown id. Locks the model.

    An agent that cannot be told now (down, partitioned) is told by the first heartbeat that
    reports the model (`heartbeats`: a model no longer in the catalog is an orphan)."""
    with transaction.atomic():
        model = Model.objects.select_for_update(of=("self",)).get(model_id=model_id)
        adapters = sorted(model.adapters.values_list("model_id", flat=True))
        if adapters:
            raise ModelInUse(
                f"{model_id} is the base of {', '.join(adapters)}: delete those adapters first"
            )
        holders = list(
            model.placements.exclude(state=PlacementState.UNLOADED, cache_level=CacheLevel.NONE)
            .order_by("agent_id")
            .values_list("agent_id", flat=True)
        )
        holding = (
            [
                p.pk
                for p in Placement.objects.filter(model_id=model.base_id)
                if model_id in p.adapters
            ]
            if model.base_id is not None
            else []
        )
        model.delete()
        for agent_pk in holders:
            steps.queue("agents.tasks.unload_orphan", agent_pk, model_id)
        for placement_pk in holding:
            steps.queue("agents.tasks.unload_adapter", placement_pk, model_id)
    log.info("model %s deleted from the catalog (%d agent(s) told to unload it)", model_id,
             len(holders) + len(holding))  # fmt: skip


def orphan_unload_target(agent_pk: int, model_id: str) -> tuple[str, str] | None:
    """Where to send the unload of a model that is no longer in the catalog: the agent's base
    URL and credential; None when the model is in the catalog again or the agent is gone."""
    if Model.objects.filter(model_id=model_id).exists():
        return None
    found = (
        Agent.objects.filter(pk=agent_pk).only("agent_id", "base_url", "credential_nonce").first()
    )
    if found is None or not found.credential:
        return None
    return found.base_url, found.credential
