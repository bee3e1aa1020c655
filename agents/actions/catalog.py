"""The model catalog: adding and updating the models clients may ask for."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import timedelta

from django.core.exceptions import ValidationError
from django.db import transaction

from agents.models import Model
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
