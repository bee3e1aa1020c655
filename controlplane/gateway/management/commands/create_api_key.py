"""`python manage.py create_api_key NAME [--models m1,m2]`: prints a new key once."""

from __future__ import annotations

from argparse import ArgumentParser, ArgumentTypeError
from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from controlplane.gateway.actions import UnknownModels, create_api_key
from controlplane.gateway.models import PriorityClasses


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ArgumentTypeError(f"{value!r} is not an integer") from None
    if number < 1:
        raise ArgumentTypeError(f"{number} is not positive")
    return number


class Command(BaseCommand):
    help = (
        "Create an API key for the OpenAI-compatible API. The key goes to standard output"
        " (alone, for scripts) and cannot be shown again: only its hash is stored."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("name", help="who or what the key is for")
        parser.add_argument(
            "--models",
            default="",
            help="comma-separated model ids the key may use (default: every enabled model)",
        )
        parser.add_argument("--rpm", type=_positive, help="requests per minute (default: no limit)")
        parser.add_argument("--tpm", type=_positive, help="tokens per minute (default: no limit)")
        parser.add_argument("--expires-in-days", type=_positive, help="expire after this many days")
        parser.add_argument(
            "--weight", type=_positive, default=1,
            help="its share of a model's seats while requests wait (default 1)",
        )  # fmt: skip
        parser.add_argument(
            "--priority-classes", choices=PriorityClasses.values, default=PriorityClasses.ANY,
            help="admission classes its requests may ask for; the first is the default "
            f"(default {PriorityClasses.ANY.value})",
        )  # fmt: skip

    def handle(self, *args: Any, **options: Any) -> None:
        model_ids = [item.strip() for item in options["models"].split(",") if item.strip()]
        days = options["expires_in_days"]
        try:
            key, raw_key = create_api_key(
                options["name"],
                model_ids,
                requests_per_minute=options["rpm"],
                tokens_per_minute=options["tpm"],
                expires_at=timezone.now() + timedelta(days=days) if days else None,
                weight=options["weight"],
                priority_classes=options["priority_classes"],
            )
        except UnknownModels as exc:
            raise CommandError(f"Unknown models, {exc}") from None
        scope = ", ".join(model_ids) if model_ids else "every enabled model"
        self.stderr.write(f"Created API key {key.name!r} ({key.prefix}…) for {scope}.")
        self.stderr.write("Store it now; it cannot be shown again.")
        self.stdout.write(raw_key)
