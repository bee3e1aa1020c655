"""Field validators for the fleet's models, shared by the ORM, the admin and the API."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator

# What OpenAI clients send as `model`: Hugging Face style ids with an optional tag.
validate_model_id = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,199}$",
    "Use letters, digits and . _ : / - (for example meta-llama/Llama-3.1-8B-Instruct).",
)

validate_agent_id = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
    "Use letters, digits and . _ - (a host name works).",
)

_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def validate_base_url(value: str) -> None:
    """An http(s) URL of a host in the fleet's network.

    Unlike Django's URLValidator, single-label host names (`http://gpu-node-3:8100`,
    as Kubernetes and /etc/hosts give them) are accepted.
    """
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValidationError(
            "Enter an http:// or https:// URL with a host, e.g. http://gpu-1:8100."
        )
    try:
        parts.port  # noqa: B018 - urlsplit checks the port only when asked
    except ValueError:
        raise ValidationError("The URL's port is not a number from 0 to 65535.") from None
    host = parts.hostname
    is_ip = bool(re.fullmatch(r"[0-9.]+", host)) or ":" in host
    if not is_ip and not all(_HOST_LABEL.match(label) for label in host.rstrip(".").split(".")):
        raise ValidationError(f"{host!r} is not a valid host name.")
    if parts.query or parts.fragment or parts.username:
        raise ValidationError("A base URL has no query, fragment or credentials.")


_AZURE_SOURCE = re.compile(r"^azure://[a-z0-9](?:[a-z0-9-]{1,61}[a-z0-9])/\S+$")


def validate_source(value: str) -> None:
    """A model source is `azure://<container>/<prefix>` or `file:///<absolute dir>`."""
    if value.startswith("azure://"):
        if not _AZURE_SOURCE.match(value):
            raise ValidationError(
                "An Azure source is azure://<container>/<prefix>; container names are"
                " 3-63 lowercase letters, digits and hyphens."
            )
        return
    if value.startswith("file://"):
        parts = urlsplit(value)
        if parts.netloc or not parts.path.startswith("/") or parts.path == "/":
            raise ValidationError("A file source is file:///<absolute directory>.")
        return
    raise ValidationError("A source is azure://<container>/<prefix> or file:///<directory>.")


def validate_engine_args(value: Any) -> None:
    """Extra engine command-line arguments, as a list of strings (`["--max-model-len", "512"]`)."""
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValidationError(
            'Engine arguments are a JSON list of strings, e.g. ["--dtype", "float32"].'
        )


def validate_labels(value: Any) -> None:
    """Agent labels are a flat JSON object of string keys and string values."""
    if not isinstance(value, dict) or not all(
        isinstance(key, str) and isinstance(item, str) for key, item in value.items()
    ):
        raise ValidationError('Labels are a JSON object of strings, e.g. {"zone": "eu-west-1a"}.')
