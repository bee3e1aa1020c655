"""`.env.example` and the docs' settings tables, written from the settings' one declaration:
the control plane's (controlplane.envspec) and the node agent's (nodeagent.config.SETTINGS).

    python -m controlplane.settingsdoc          # rewrite .env.example
    python -m controlplane.settingsdoc --check  # exit 1 when .env.example is out of date

The docs build calls `markdown()` through its hook (scripts/docs_hooks.py), so the settings
page is never written by hand; a test keeps `.env.example` equal to `env_example()`.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Iterator
from itertools import groupby
from pathlib import Path

from controlplane.envspec import SECTIONS, VARS, Group, Value, Var
from nodeagent.config import SETTINGS, Setting

ENV_EXAMPLE = Path(__file__).resolve().parent.parent / ".env.example"
_WIDTH = 96
_INTRO = """\
llmfleet's settings, written from their declarations by `python -m controlplane.settingsdoc`
(controlplane/envspec.py and nodeagent/config.py): edit those, not this file. Every one is
optional on a single machine (the embedded defaults); a real deployment sets DATABASE_URL,
REDIS_URL, SECRET_KEY and AGENT_TOKEN. The processes read the environment: export these,
use your process manager, or `docker compose --env-file .env`."""
_AGENT_TITLE = "node agent (python -m nodeagent; `make agent` fills in local defaults)"


def _shown(value: Value) -> str:
    """A value as it is written in the environment."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


def _comment(text: str) -> list[str]:
    return [f"# {line}" for line in textwrap.wrap(text, _WIDTH - 2, break_on_hyphens=False)]


def _header(title: str) -> str:
    return f"# --- {title} ".ljust(_WIDTH, "-")


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + ("" if text.endswith((".", ")")) else ".")


def _agent_settings() -> list[Setting]:
    # AGENT_TOKEN is the control plane's too: one line for both.
    return [setting for setting in SETTINGS if setting.env not in VARS]


def _env_lines() -> Iterator[str]:
    yield from _comment(_INTRO)
    for section in SECTIONS:
        yield ""
        yield _header(section.title)
        if section.note:
            yield from _comment(section.note)
        for group in section.groups:
            unset = "".join(f" {var.name} unset: {var.unset}." for var in group.vars if var.unset)
            yield from _comment(_sentence(group.help) + unset)
            for var in group.vars:
                value = var.example if var.example is not None else _shown(var.default)
                yield f"{'# ' if var.commented else ''}{var.name}={value}"
        if section.title.startswith("`make run`"):
            yield ""
            yield _header(_AGENT_TITLE)
            for setting in _agent_settings():
                yield from _comment(f"{setting.flag}: {setting.help}")
                yield f"{setting.env}={setting.default}"


def env_example() -> str:
    return "\n".join(_env_lines()) + "\n"


# --- the docs' tables ---


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _bounds(var: Var) -> str:
    if var.choices:
        return f" One of: {', '.join(f'`{choice}`' for choice in var.choices)}."
    if var.minimum is not None:
        return f" At least {var.minimum}."
    return ""


def _default_shown(var: Var) -> str:
    if shown := _shown(var.default):
        return f"&nbsp;=&nbsp;`{shown}`"
    return f" (unset: {_cell(var.unset)})" if var.unset else ""


def _group_row(group: Group) -> str:
    names = "<br>".join(f"`{var.name}`{_default_shown(var)}" for var in group.vars)
    secret = (
        f" Or `{group.vars[0].name}_FILE`: a file that holds it." if group.vars[0].secret else ""
    )
    bounds = "".join(_bounds(var) for var in group.vars if len(group.vars) == 1)
    return f"| {names} | {_cell(_sentence(group.help))}{bounds}{secret} |"


def _controlplane_markdown() -> Iterator[str]:
    for section in SECTIONS:
        yield f"### {section.title[:1].upper()}{section.title[1:]}"
        yield ""
        if section.read_by != "control plane" or section.note:
            yield f"Read by the {section.read_by}, not by llmfleet's own code. " * (
                section.read_by != "control plane"
            ) + _cell(section.note)
            yield ""
        yield "| Variable and default | What it does |"
        yield "|---|---|"
        yield from (_group_row(group) for group in section.groups)
        yield ""


def _agent_markdown() -> Iterator[str]:
    for title, settings in groupby(SETTINGS, key=lambda setting: setting.section):
        yield f"### {title}"
        yield ""
        yield "| Flag | Variable | Default | What it does |"
        yield "|---|---|---|---|"
        for setting in settings:
            default = f"`{setting.default}`" if setting.default else ""
            choices = f" One of: {', '.join(setting.choices)}." if setting.choices else ""
            yield (
                f"| `{setting.flag}` | `{setting.env}` | {default} "
                f"| {_cell(_sentence(setting.help))}{choices} |"
            )
        yield ""


def markdown(which: str) -> str:
    """The settings tables of `which` ("controlplane" or "agent"), as Markdown."""
    lines = {"controlplane": _controlplane_markdown, "agent": _agent_markdown}[which]()
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only say whether it is current")
    args = parser.parse_args(argv)
    text = env_example()
    if args.check:
        current = ENV_EXAMPLE.read_text() == text
        print(
            f".env.example is {'current' if current else 'out of date: run this without --check'}"
        )
        return 0 if current else 1
    ENV_EXAMPLE.write_text(text)
    print(f"wrote {ENV_EXAMPLE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
