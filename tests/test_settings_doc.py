"""Settings are declared once (controlplane.envspec, nodeagent.config.SETTINGS), and what
documents them is written from those declarations."""

from __future__ import annotations

import re
from pathlib import Path

from controlplane import settingsdoc
from controlplane.envspec import SECTIONS, VARS
from nodeagent.config import SETTINGS

ROOT = Path(__file__).resolve().parents[1]
# A read of a variable anywhere in the control plane's code: a typed reader, or os.environ.
READ = re.compile(r"""(?:env_\w+|_secret|os\.environ\.get)\(\s*"([A-Z][A-Z0-9_]+)\"""")


def reads() -> set[str]:
    return {
        name
        for path in (ROOT / "controlplane").rglob("*.py")
        for name in READ.findall(path.read_text())
    } - {"DJANGO_SETTINGS_MODULE"}


def test_env_example_is_written_from_the_declarations():
    # `python -m controlplane.settingsdoc` rewrites it after a declaration changes.
    assert (ROOT / ".env.example").read_text() == settingsdoc.env_example()


def test_every_variable_the_control_plane_reads_is_declared():
    agent = {setting.env for setting in SETTINGS}
    assert {"DATABASE_URL", "WEB_PORT", "FLEET_AGENT", "GATEWAY_MAX_BODY_BYTES"} <= reads()
    assert reads() - VARS.keys() - agent == set()


def test_every_declared_variable_of_the_control_plane_is_read():
    own = {
        var.name
        for section in SECTIONS
        if section.read_by == "control plane"
        for group in section.groups
        for var in group.vars
    }
    assert own - reads() == set()


def test_the_tables_name_every_setting_with_its_default():
    controlplane, agent = settingsdoc.markdown("controlplane"), settingsdoc.markdown("agent")
    assert {name for name in VARS if f"`{name}`" not in controlplane} == set()
    assert "`GATEWAY_QUEUE_MAX`&nbsp;=&nbsp;`1000`" in controlplane
    assert {s.env for s in SETTINGS if f"| `{s.flag}` | `{s.env}` |" not in agent} == set()
    assert "| `--port` | `AGENT_PORT` | `8100` |" in agent
