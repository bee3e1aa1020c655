"""Typed readers for settings taken from the environment.

Every setting of llmfleet comes through one of these, so that a bad value
stops the process at start with an error that names the variable, instead of
surfacing later as a confusing failure somewhere else. Defaults and bounds come
from each variable's one declaration, in `controlplane.envspec`.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import TypeVar

from django.core.exceptions import ImproperlyConfigured

from controlplane.envspec import VARS, Var

_T = TypeVar("_T")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def declared(name: str) -> Var:
    """The variable's declaration (controlplane.envspec): its default and bounds."""
    try:
        return VARS[name]
    except KeyError:
        raise ImproperlyConfigured(
            f"{name} is read but not declared in controlplane.envspec"
        ) from None


def _default(name: str, kind: type[_T]) -> _T:
    default = declared(name).default
    if not isinstance(default, kind):
        raise ImproperlyConfigured(
            f"{name} is declared as {type(default).__name__}, read as {kind.__name__}"
        )
    return default


def env_str(name: str) -> str:
    """The variable's value with surrounding whitespace removed, or its default when unset."""
    value = os.environ.get(name)
    return _default(name, str) if value is None else value.strip()


def env_bool(name: str) -> bool:
    value = os.environ.get(name)
    if value is None:
        return _default(name, bool)
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name}={value!r} is not a boolean (use true/false, 1/0, yes/no)")


def env_int(name: str) -> int:
    """An integer, at least the declared minimum."""
    value = os.environ.get(name)
    if value is None or not value.strip():
        return _default(name, int)
    try:
        number = int(value.strip())
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r} is not an integer") from None
    minimum = declared(name).minimum
    if minimum is not None and number < minimum:
        raise ImproperlyConfigured(f"{name}={number} is below its minimum of {minimum}")
    return number


def env_choice(name: str) -> str:
    """One of the declared choices (the value lowercased), or the default when unset."""
    value = os.environ.get(name)
    if value is None or not value.strip():
        return _default(name, str)
    lowered = value.strip().lower()
    choices = declared(name).choices
    if lowered not in choices:
        raise ImproperlyConfigured(f"{name}={value!r} is not one of: {', '.join(choices)}")
    return lowered


def env_list(name: str) -> list[str]:
    """A comma-separated list; empty items are dropped."""
    value = os.environ.get(name)
    if value is None:
        return list(_default(name, tuple))
    return [item.strip() for item in value.split(",") if item.strip()]


def env_secret(name: str) -> str:
    """A secret from `NAME`, or from the file named by `NAME_FILE` (Docker and Kubernetes secrets).

    Setting both is refused: one of them would be silently ignored.
    """
    if not declared(name).secret:
        raise ImproperlyConfigured(f"{name} is read as a secret but not declared as one")
    direct = os.environ.get(name)
    path = os.environ.get(f"{name}_FILE")
    if direct is not None and path is not None:
        raise ImproperlyConfigured(f"set {name} or {name}_FILE, not both")
    if path is None:
        return (direct or "").strip()
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ImproperlyConfigured(f"{name}_FILE={path!r} cannot be read: {exc.strerror}") from None


def local_secret(path: Path) -> str:
    """A random secret kept in `path`, created (mode 0600) on first use.

    Used only for embedded single-machine runs, where every process shares the
    directory; production deployments set the secret explicitly.
    """
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_urlsafe(48))
    try:
        # link() never replaces: when two processes start at once, the first wins and
        # the other reads the winner's complete file, never a half-written one.
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_text().strip()
