"""The documentation: the site's configuration page gets every setting from the settings'
declarations, every page is in the site's navigation, and the README's first command block
is what CI runs (.env.example: tests/test_settings_doc.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# Where the mkdocs hook (scripts/docs_hooks.py) writes the generated settings tables.
SETTINGS_MARKERS = ("<!-- settings: controlplane -->", "<!-- settings: agent -->")


def test_the_configuration_page_has_both_settings_tables():
    """The tables are generated from the code at build time, so none can go stale by hand;
    each marker must stand alone on its line, once, for the hook to replace it."""
    lines = (DOCS / "configuration.md").read_text().splitlines()
    for marker in SETTINGS_MARKERS:
        assert lines.count(marker) == 1, marker


def test_the_configuration_page_shows_every_setting():
    from controlplane.envspec import VARS
    from nodeagent.config import SETTINGS
    from scripts.docs_hooks import on_page_markdown

    page = on_page_markdown((DOCS / "configuration.md").read_text())
    assert not any(marker in page for marker in SETTINGS_MARKERS)
    names = set(VARS) | {setting.env for setting in SETTINGS} | {s.flag for s in SETTINGS}
    assert {name for name in names if f"`{name}`" not in page} == set()


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
