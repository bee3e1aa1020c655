"""Field validators for the fleet's models, shared by the ORM, the admin and the API."""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Any
from urllib.parse import urlsplit

from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator

from nodeagent import engineargs

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


# Cloud metadata services by name (their addresses are link-local, refused below too).
_METADATA_HOSTS = {"metadata", "metadata.google.internal", "metadata.azure.com", "instance-data"}
# AWS's IPv6 metadata address is in fd00::/8, a private range: refused by name.
_METADATA_ADDRESSES = {ipaddress.ip_address("fd00:ec2::254")}


def address_refusal(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
    *,
    allow_loopback: bool,
    allow_private: bool,
) -> str | None:
    """Why an agent may not live at `address`, or None when it may."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    if address in _METADATA_ADDRESSES or address.is_link_local:
        return "a link-local or cloud metadata address"
    if address.is_multicast or address.is_unspecified or address.is_reserved:
        return "not a host address"
    if address.is_loopback:
        return None if allow_loopback else "a loopback address (AGENT_ALLOW_LOOPBACK is off)"
    if address.is_private and not allow_private:
        return "a private address (AGENT_ALLOW_PRIVATE_NETWORKS is off)"
    return None


def validate_agent_address(
    value: str, *, allow_loopback: bool, allow_private: bool, resolve: bool = True
) -> None:
    """An agent's base URL must not point where the gateway must never post prompts: link-local
    and metadata addresses always, loopback and private ranges when the settings say so. A host
    name is checked by what it resolves to now (one that does not resolve passes: it is no
    target yet, and each registration checks again)."""
    validate_base_url(value)
    host = (urlsplit(value).hostname or "").rstrip(".").lower()
    if host in _METADATA_HOSTS:
        raise ValidationError(f"{host!r} is a cloud metadata service, not an agent.")
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        addresses = _resolve(host) if resolve else []
    for address in addresses:
        refusal = address_refusal(
            address, allow_loopback=allow_loopback, allow_private=allow_private
        )
        if refusal:
            raise ValidationError(f"{host!r} is {refusal}: agents may not live there.")


def _resolve(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return []
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


def url_is_under(url: str, base: str) -> bool:
    """Whether `url` lies under `base` (same scheme, host and port, and below its path)."""
    inner, outer = urlsplit(url), urlsplit(base)
    if (inner.scheme, inner.netloc.lower()) != (outer.scheme, outer.netloc.lower()):
        return False
    if inner.query or inner.fragment or inner.username or ".." in inner.path.split("/"):
        return False
    prefix = outer.path.rstrip("/") + "/"
    return inner.path.startswith(prefix)


# Each cloud's own naming rules for containers and buckets, then a non-empty prefix.
_BUCKET_SOURCES = {
    "azure": (
        re.compile(r"^azure://[a-z0-9](?:[a-z0-9-]{1,61}[a-z0-9])/\S+$"),
        "An Azure source is azure://<container>/<prefix>; container names are"
        " 3-63 lowercase letters, digits and hyphens.",
    ),
    "s3": (
        re.compile(r"^s3://[a-z0-9](?:[a-z0-9.-]{1,61}[a-z0-9])/\S+$"),
        "An S3 source is s3://<bucket>/<prefix>; bucket names are 3-63 lowercase letters,"
        " digits, dots and hyphens.",
    ),
    "gs": (
        re.compile(r"^gs://[a-z0-9](?:[a-z0-9._-]{1,220}[a-z0-9])/\S+$"),
        "A GCS source is gs://<bucket>/<prefix>; bucket names are 3-222 lowercase letters,"
        " digits, dots, hyphens and underscores.",
    ),
}


def validate_source(value: str) -> None:
    """A model source is `azure://<container>/<prefix>`, `s3://<bucket>/<prefix>`,
    `gs://<bucket>/<prefix>` or `file:///<absolute dir>`."""
    scheme = value.partition("://")[0]
    if scheme in _BUCKET_SOURCES:
        pattern, message = _BUCKET_SOURCES[scheme]
        if not pattern.match(value):
            raise ValidationError(message)
        return
    if value.startswith("file://"):
        parts = urlsplit(value)
        if parts.netloc or not parts.path.startswith("/") or parts.path == "/":
            raise ValidationError("A file source is file:///<absolute directory>.")
        return
    raise ValidationError(
        "A source is azure://<container>/<prefix>, s3://<bucket>/<prefix>, "
        "gs://<bucket>/<prefix> or file:///<directory>."
    )


def validate_engine_args(value: Any) -> None:
    """Extra engine command-line arguments, as a list of strings (`["--max-model-len", "512"]`),
    each flag on the allow-list (nodeagent.engineargs: an operator tunes vLLM, never binds it
    elsewhere or makes it run code)."""
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValidationError(
            'Engine arguments are a JSON list of strings, e.g. ["--dtype", "float32"].'
        )
    if found := engineargs.problems(value):
        raise ValidationError(found)


def validate_labels(value: Any) -> None:
    """Agent labels are a flat JSON object of string keys and string values."""
    if not isinstance(value, dict) or not all(
        isinstance(key, str) and isinstance(item, str) for key, item in value.items()
    ):
        raise ValidationError('Labels are a JSON object of strings, e.g. {"zone": "eu-west-1a"}.')


# A model's mirrors: more places its files are published (one per cloud or region, say).
MAX_MIRRORS = 8


def validate_mirrors(value: Any) -> None:
    """A model's mirrors: a JSON list of {"uri": a source, "labels": {...}}, each URI once."""
    example = '[{"uri": "s3://models/org/name", "labels": {"cloud": "aws"}}]'
    if not isinstance(value, list) or len(value) > MAX_MIRRORS:
        raise ValidationError(f"Mirrors are a JSON list of at most {MAX_MIRRORS}, e.g. {example}.")
    seen: set[str] = set()
    for position, mirror in enumerate(value):
        if not isinstance(mirror, dict) or not isinstance(mirror.get("uri"), str):
            raise ValidationError(f"Mirror {position + 1} is not an object with a uri: {example}.")
        try:
            validate_source(mirror["uri"])
            validate_labels(mirror.get("labels", {}))
        except ValidationError as exc:
            raise ValidationError(f"Mirror {position + 1}: {' '.join(exc.messages)}") from None
        if mirror["uri"] in seen:
            raise ValidationError(f"Mirror {position + 1} repeats {mirror['uri']}.")
        seen.add(mirror["uri"])


def mirror_problem(source: str, mirrors: Any, *, adapter: bool = False) -> str:
    """What is wrong with a model's mirrors beside its source ("" when nothing): a mirror
    repeating the source, or mirrors of a LoRA adapter (its one source is its base's
    engines' to read)."""
    if adapter and mirrors:
        return "A LoRA adapter has one source and no mirrors."
    if any(isinstance(m, dict) and m.get("uri") == source for m in mirrors or ()):
        return f"{source} is the source already."
    return ""
