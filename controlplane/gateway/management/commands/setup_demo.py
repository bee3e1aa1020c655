"""`manage.py setup_demo`: what `make run` needs before its first request.

Builds the tiny checkpoint (deterministic, offline), publishes it into the embedded
local store, registers it in the catalog (as a text generation model and, under
its own id, as an embedding model), does the same for a LoRA adapter of it, and
keeps one API key in a file for the printed commands. Idempotent: a second run
reuses all of it.
"""

from __future__ import annotations

import os
import sys
from argparse import ArgumentParser
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from agents.actions import register_catalog_model
from agents.choices import ModelKind
from controlplane.gateway.actions import create_api_key
from controlplane.gateway.models import ApiKey
from nodeagent import tinymodel
from nodeagent.gpu import GpuMonitor
from nodeagent.store import Manifest, StoreError, read_manifest
from nodeagent.store.publish import publish

DEMO_MODEL = "llmfleet/tiny"
# The same checkpoint served as an embedding model (vLLM's pooling runner over it), so the
# docs can show /v1/embeddings against `make run`.
DEMO_EMBEDDING_MODEL = "llmfleet/tiny-embed"
# A LoRA adapter of the tiny checkpoint: its first request loads it into the base's engine.
DEMO_ADAPTER = "llmfleet/tiny-lora"
# What vLLM's CPU build needs to start the tiny model quickly (../shared/FACTS.md).
CPU_ENGINE_ARGS = [
    "--max-model-len", "512", "--dtype", "float32", "--enforce-eager",
    "--kv-cache-memory-bytes", "64M", "--max-num-seqs", "8",
]  # fmt: skip
GPU_ENGINE_ARGS = ["--max-model-len", "512", "--enforce-eager"]


class Command(BaseCommand):
    help = "Publish and register the tiny demo model, and keep an API key for it in a file."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--store",
            default=None,
            help="where to publish it: azure://<container>/<prefix>, s3://<bucket>/<prefix>, "
            "gs://<bucket>/<prefix> or file:///<directory> "
            "(default: file:// under VAR_DIR/store, which only agents on this machine can read)",
        )
        parser.add_argument(
            "--key-file",
            type=Path,
            default=None,
            help="where the demo API key is kept (default: VAR_DIR/demo-api-key)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        var_dir = Path(settings.VAR_DIR)
        checkpoint = var_dir / "demo" / "tiny-checkpoint"
        uri = options["store"] or (var_dir / "store" / DEMO_MODEL).as_uri()
        if not (checkpoint / "config.json").exists():
            self.stdout.write(f"Building the tiny checkpoint in {checkpoint}")
            tinymodel.build(checkpoint)
        manifest = self._published(checkpoint, uri)
        monitor = GpuMonitor()
        engine_args = GPU_ENGINE_ARGS if monitor.snapshot() else CPU_ENGINE_ARGS
        monitor.close()
        model, created = register_catalog_model(
            DEMO_MODEL, uri, size_bytes=manifest.total_size, engine_args=engine_args,
            manifest=manifest.identity,
        )  # fmt: skip
        self.stdout.write(f"{'Registered' if created else 'Kept'} {model.model_id} from {uri}")
        embedder, created = register_catalog_model(
            DEMO_EMBEDDING_MODEL, uri, size_bytes=manifest.total_size, engine_args=engine_args,
            kind=ModelKind.EMBEDDING, manifest=manifest.identity,
        )  # fmt: skip
        self.stdout.write(
            f"{'Registered' if created else 'Kept'} {embedder.model_id} (embeddings) from {uri}"
        )
        adapter_dir, adapter_uri = var_dir / "demo" / "tiny-lora", f"{uri}-lora"
        if not (adapter_dir / "adapter_config.json").exists():
            tinymodel.build_adapter(adapter_dir)
        adapter_manifest = self._published(adapter_dir, adapter_uri)
        adapter, created = register_catalog_model(
            DEMO_ADAPTER, adapter_uri, size_bytes=adapter_manifest.total_size,
            base=DEMO_MODEL, adapter_rank=8,
        )  # fmt: skip
        self.stdout.write(
            f"{'Registered' if created else 'Kept'} {adapter.model_id} (a LoRA adapter of "
            f"{DEMO_MODEL}) from {adapter_uri}"
        )
        self._keep_key(options["key_file"] or var_dir / "demo-api-key")

    def _published(self, directory: Path, uri: str) -> Manifest:
        """The manifest at `uri`, publishing `directory` there first if nothing is."""
        try:
            return read_manifest(uri, os.environ)
        except StoreError as exc:
            if exc.code != "model_not_found":
                raise CommandError(f"{uri}: {exc}") from None
        self.stdout.write(f"Publishing it to {uri}")
        publish(directory, uri, os.environ, stream=sys.stdout)
        return read_manifest(uri, os.environ)

    def _keep_key(self, key_file: Path) -> None:
        secret = key_file.read_text().strip() if key_file.exists() else ""
        existing = ApiKey.objects.for_secret(secret).first() if secret else None
        if existing is None or existing.inactive_reason() is not None:
            _, secret = create_api_key("demo")
            key_file.parent.mkdir(parents=True, exist_ok=True)
            # Created private: the file holds a working credential.
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secret + "\n")
            self.stdout.write(f"Created the demo API key; it is kept in {key_file}")
