"""The documentation: .env.example names every setting the code reads, the site's
configuration page has the markers its settings tables are generated at, every page is in
the site's navigation, and the README's first command block is what CI runs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
READERS = re.compile(r"""(?:env_\w+|_secret|_env_int|os\.environ\.get)\(\s*"([A-Z][A-Z0-9_]+)\"""")
# Where the mkdocs hook (scripts/docs_hooks.py) writes the generated settings tables.
SETTINGS_MARKERS = ("<!-- settings: controlplane -->", "<!-- settings: agent -->")


def settings_read_by_the_code() -> set[str]:
    sources = [ROOT / "controlplane" / "settings.py", ROOT / "controlplane" / "fleet.py"]
    names = {name for path in sources for name in READERS.findall(path.read_text())}
    assert {"DATABASE_URL", "AGENT_TOKEN", "WEB_PORT"} <= names, "the pattern went stale"
    return names - {"DJANGO_SETTINGS_MODULE"}


def test_every_setting_is_in_env_example():
    example = (ROOT / ".env.example").read_text()
    documented = set(re.findall(r"^([A-Z][A-Z0-9_]+)=", example, re.MULTILINE))
    assert settings_read_by_the_code() <= documented


def test_the_configuration_page_has_both_settings_tables():
    """The tables are generated from the code at build time, so none can go stale by hand;
    each marker must stand alone on its line, once, for the hook to replace it."""
    lines = (DOCS / "configuration.md").read_text().splitlines()
    for marker in SETTINGS_MARKERS:
        assert lines.count(marker) == 1, marker


def nav_pages(entries: list[Any]) -> list[str]:
    pages: list[str] = []
    for entry in entries:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages += nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_every_page_is_in_the_navigation_and_every_entry_exists():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    pages = nav_pages(config["nav"])
    assert len(pages) == len(set(pages)), "a page is in the navigation twice"
    assert {page for page in pages if not (DOCS / page).is_file()} == set()
    on_disk = {path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md")}
    assert on_disk - set(pages) == set()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme.split("```")[1]
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("exec make test")
