"""`python manage.py register_model MODEL_ID URI [options]`: catalog a published model."""

from __future__ import annotations

import json
import os
import re
import shlex
from argparse import ArgumentParser, ArgumentTypeError
from datetime import timedelta
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from agents.actions import register_catalog_model
from agents.choices import ModelKind
from nodeagent.protocol import SourceSpec
from nodeagent.store import Manifest, StoreError, read_file, read_manifest
from nodeagent.values import parse_labels

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(value: str) -> timedelta:
    """`300`, `90s`, `10m`, `2h`, `1d`."""
    match = _DURATION.match(value.strip().lower())
    if match is None:
        raise ArgumentTypeError(f"{value!r} is not a duration like 300s, 10m or 2h")
    return timedelta(seconds=float(match.group(1)) * _SECONDS[match.group(2)])


def gigabytes(value: str) -> int:
    try:
        number = float(value)
    except ValueError:
        raise ArgumentTypeError(f"{value!r} is not a number of GB") from None
    if number < 0:
        raise ArgumentTypeError(f"{value!r} is negative")
    return int(number * 1e9)


def source_spec(text: str) -> SourceSpec:
    """`URI` or `URI#key=value,key=value`: a source and the labels saying where it is."""
    uri, _, labels = text.partition("#")
    return SourceSpec(uri.strip(), parse_labels(labels))


def agreeing_manifest(sources: list[SourceSpec]) -> Manifest:
    """The manifest every source holds; CommandError naming the source that cannot be read
    or whose manifest is another model's (nothing is registered then)."""
    manifests = []
    for source in sources:
        try:
            manifests.append(read_manifest(source.uri, os.environ))
        except StoreError as exc:
            raise CommandError(f"{source.uri}: {exc} ({exc.code})") from None
    first = manifests[0]
    for source, manifest in zip(sources[1:], manifests[1:], strict=True):
        differences = first.differences(manifest)
        if differences:
            shown = "; ".join(differences[:5]) + ("; …" if len(differences) > 5 else "")
            raise CommandError(
                f"Not registered: {source.uri} holds another model than {sources[0].uri} "
                f"(its manifest differs: {shown})"
            )
    return first


def adapter_rank(uri: str) -> int:
    """The rank `r` of the LoRA adapter published at `uri` (its adapter_config.json)."""
    try:
        config = json.loads(
            read_file(uri, "adapter_config.json", os.environ, f"{uri} holds no adapter_config.json")
        )
    except StoreError as exc:
        raise CommandError(f"{uri}: {exc} ({exc.code})") from None
    except ValueError as exc:
        raise CommandError(f"{uri}: adapter_config.json is not JSON: {exc}") from None
    rank = config.get("r") if isinstance(config, dict) else None
    if not isinstance(rank, int) or rank < 1:
        raise CommandError(f"{uri}: adapter_config.json has no rank `r` (a positive integer)")
    return rank


class Command(BaseCommand):
    help = (
        "Add a model published with `python -m nodeagent publish` to the catalog (or update it), "
        "reading its size and files from the store's manifest. Credentials come from the "
        "environment as docs/stores.md says: Azure's AZURE_STORAGE_*, AWS's "
        "standard variables and profiles, GOOGLE_APPLICATION_CREDENTIALS or ADC."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("model_id", help="the name clients send as `model`")
        parser.add_argument(
            "sources",
            nargs="+",
            type=source_spec,
            metavar="URI[#LABELS]",
            help="where the model is published: azure://<container>/<prefix>, "
            "s3://<bucket>/<prefix>, gs://<bucket>/<prefix> or file:///<directory>. More than "
            "one: the same model in several stores (their manifests must agree), each with "
            "labels saying where it is, e.g. s3://models/llama#cloud=aws,region=us-east-1; "
            "agents read from the one sharing their zone, region or cloud first",
        )
        parser.add_argument(
            "--revision", default="", help="a label; changing it makes agents download again"
        )
        parser.add_argument(
            "--kind",
            choices=[kind.value for kind in ModelKind],
            default=None,
            help="generate (chat, completions, responses; the default) or embedding "
            "(/v1/embeddings; its engines start as vLLM pooling runners)",
        )
        parser.add_argument(
            "--engine-args",
            default=None,
            help='engine arguments, e.g. "--max-model-len 8192 --dtype bfloat16"',
        )
        parser.add_argument(
            "--gpu-memory-gb", type=gigabytes, help="GPU memory one replica needs, in GB"
        )
        parser.add_argument(
            "--keep-alive", type=duration, help="idle time before stepping down (10m, 1h)"
        )
        parser.add_argument(
            "--max-keep-alive",
            type=duration,
            help="the longest idle time a request's keep_alive may ask for (default 1h)",
        )
        parser.add_argument(
            "--min-replicas", type=int, help="replicas kept loaded (0: scale to zero)"
        )
        parser.add_argument("--max-replicas", type=int, help="most replicas loaded at once")
        parser.add_argument(
            "--pinned", action="store_true", default=None, help="never evicted from the GPU"
        )
        parser.add_argument("--disabled", action="store_true", help="in the catalog but not served")
        parser.add_argument(
            "--base",
            metavar="MODEL_ID",
            help="register a LoRA adapter (published like a checkpoint, with its "
            "adapter_config.json) of this catalog model; its rank is read from the config",
        )
        parser.add_argument(
            "--max-loras",
            type=int,
            help="for a base model: adapters one engine holds at once (default 4)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        sources: list[SourceSpec] = options["sources"]
        uri = sources[0].uri
        if len({source.uri for source in sources}) != len(sources):
            raise CommandError("Not registered: a source is named twice")
        if options["base"] and len(sources) > 1:
            raise CommandError("Not registered: a LoRA adapter has one source")
        manifest = agreeing_manifest(sources)
        engine_args = (
            shlex.split(options["engine_args"]) if options["engine_args"] is not None else None
        )
        rank = adapter_rank(uri) if options["base"] else None
        try:
            model, created = register_catalog_model(
                options["model_id"],
                uri,
                size_bytes=manifest.total_size,
                revision=options["revision"],
                kind=options["kind"],
                engine_args=engine_args,
                gpu_memory_bytes=options["gpu_memory_gb"],
                keep_alive=options["keep_alive"],
                max_keep_alive=options["max_keep_alive"],
                min_replicas=options["min_replicas"],
                max_replicas=options["max_replicas"],
                pinned=options["pinned"],
                enabled=not options["disabled"],
                base=options["base"],
                adapter_rank=rank,
                max_loras=options["max_loras"],
                source_labels=sources[0].labels,
                mirrors=sources[1:],
                manifest=manifest.identity,
            )
        except ValidationError as exc:
            problems = "; ".join(
                f"{field}: {' '.join(errors)}" for field, errors in exc.message_dict.items()
            )
            raise CommandError(f"Not registered: {problems}") from None
        verb = "Registered" if created else "Updated"
        if model.base is not None:
            verb += f" LoRA adapter (rank {model.adapter_rank}) of {model.base.model_id}:"
        total = manifest.total_size
        shown = f"{total / 1e9:.2f} GB" if total >= 1e9 else f"{total / 1e6:.1f} MB"
        size = f"{len(manifest.files)} files, {shown}"
        mirrors = f" (and {len(sources) - 1} mirror(s))" if len(sources) > 1 else ""
        self.stdout.write(f"{verb} {model.model_id} from {uri}{mirrors}: {size}")
