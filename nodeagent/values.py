"""How the node agent reads each setting's text (nodeagent.config): every parser turns a flag's
or a variable's text into the field's value, or raises ArgumentTypeError saying why not."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nodeagent.engines.identity import EngineUser


def float_between(low: float, high: float) -> Callable[[str], float]:
    def parse(value: str) -> float:
        number = float(value)
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"{value} is not between {low} and {high}")
        return number

    parse.__name__ = "float"  # argparse names the type in "invalid float value"
    return parse


def at_least(low: float, kind: type[int] | type[float]) -> Callable[[str], Any]:
    """A number, raised to `low` when it is below (a setting whose floor is a safety limit)."""

    def parse(value: str) -> int | float:
        return max(kind(value), kind(low))

    parse.__name__ = kind.__name__
    return parse


def parse_labels(value: str) -> dict[str, str]:
    """`zone=eu-1a,cloud=aws` as a dict (ArgumentTypeError naming an item that is not
    key=value): an agent's --labels, and a source's in register_model."""
    labels = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        key, sep, label = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"labels are key=value pairs, not {item!r}")
        labels[key.strip()] = label.strip()
    return labels


_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_bytes(value: str) -> int:
    """`500G`, `1.5T`, `512M` or a plain number of bytes."""
    text = value.strip().upper().removesuffix("IB").removesuffix("B")
    unit = text[-1:] if text[-1:] in _UNITS else ""
    try:
        number = float(text[: len(text) - len(unit)] if unit else text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a size like 500G or 512M") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value!r} is negative")
    return int(number * _UNITS[unit])


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return number


def mib(value: str) -> int:
    return positive_int(value) * 1024 * 1024


def mb_per_s(value: str) -> float:
    return float(value) * 1e6


def count_or_auto(value: str) -> int | None:
    if str(value).strip().lower() in {"", "auto"}:
        return None
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value} is not auto or a count of 0 or more")
    return number


def boolean(value: str) -> bool:
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not true or false")


def directory(value: str) -> Path:
    return Path(value).expanduser().resolve()


def optional_path(value: str) -> Path | None:
    return Path(value).expanduser() if value else None


def names(value: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in value.split(",") if name.strip())


def engine_user(value: str) -> str:
    try:
        EngineUser.lookup(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value
