"""The README and .env.example name every setting the code reads."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
READERS = re.compile(r"""(?:env_\w+|_secret|_env_int|os\.environ\.get)\(\s*"([A-Z][A-Z0-9_]+)\"""")


def settings_read_by_the_code() -> set[str]:
    sources = [ROOT / "controlplane" / "settings.py", ROOT / "controlplane" / "fleet.py"]
    names = {name for path in sources for name in READERS.findall(path.read_text())}
    assert {"DATABASE_URL", "AGENT_TOKEN", "WEB_PORT"} <= names, "the pattern went stale"
    return names - {"DJANGO_SETTINGS_MODULE"}


def test_every_setting_is_in_env_example():
    example = (ROOT / ".env.example").read_text()
    documented = set(re.findall(r"^([A-Z][A-Z0-9_]+)=", example, re.MULTILINE))
    assert settings_read_by_the_code() <= documented


def test_every_setting_is_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    missing = {name for name in settings_read_by_the_code() if f"`{name}" not in readme}
    assert not missing


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme.split("```")[1]
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("exec make test")
