"""The code's layout keeps the promises the docs make of it (docs/development.md): the apps
import in one direction, and no module grows past what one reader takes in."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("controlplane", "agents", "nodeagent")
# The benchmarks and the tests are read like the packages, so they are held to the same length.
SOURCES = (*PACKAGES, "bench", "tests")
# Lines a module may have: past this, it is two concerns (the protocol's dataclasses are one
# contract, read whole, and migrations are generated).
MAX_LINES = 460
LONG_ON_PURPOSE = {Path("nodeagent/protocol.py")}


def modules(*packages: str) -> Iterator[Path]:
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "migrations" not in path.parts:
                yield path


def imported(path: Path) -> Iterator[str]:
    """Every module `path` imports, at its top or inside a function."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module


def test_agents_never_import_the_gateway():
    # The gateway builds on agents (placements, models, actions); an import back, even one
    # hidden in a function body, is a cycle.
    offenders = {
        str(path.relative_to(ROOT)): name
        for path in modules("agents")
        for name in imported(path)
        if name == "controlplane.gateway" or name.startswith("controlplane.gateway.")
    }
    assert not offenders


def test_the_node_agent_never_imports_django_or_the_control_plane():
    offenders = {
        str(path.relative_to(ROOT)): name
        for path in modules("nodeagent")
        for name in imported(path)
        if name.split(".")[0] in {"django", "rest_framework", "channels", "agents", "controlplane"}
    }
    assert not offenders


def test_no_module_is_two_modules():
    # Each folder is walked: one renamed away would otherwise pass unchecked.
    assert {path.relative_to(ROOT).parts[0] for path in modules(*SOURCES)} == set(SOURCES)
    long = {
        str(path.relative_to(ROOT)): lines
        for path in modules(*SOURCES)
        if path.relative_to(ROOT) not in LONG_ON_PURPOSE
        and (lines := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long
