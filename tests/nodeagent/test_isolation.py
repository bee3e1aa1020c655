from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONTROL_PLANE = ("django", "rest_framework", "channels", "celery", "controlplane", "agents")


def test_the_node_agent_never_imports_django():
    modules = ", ".join(
        f"nodeagent.{name}"
        for name in (
            "__main__",
            "server",
            "registry",
            "proxy",
            "engines.vllm",
            "engines.sim",
            "gpu",
            "tinymodel",
        )
    )
    code = (
        f"import sys, {modules}\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {CONTROL_PLANE!r})\n"
        "print(bad)\nsys.exit(1 if bad else 0)"
    )
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_python_m_nodeagent_help_runs_alone():
    result = subprocess.run(
        [sys.executable, "-m", "nodeagent", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    assert "AGENT_TOKEN" in result.stdout


def test_the_agent_installs_as_a_package_of_its_own(tmp_path):
    """`pip install .` gives the node agent alone, and it runs away from this source tree."""
    # Built from a copy: a build in place would leave build/ and egg-info in the checkout.
    source = tmp_path / "source"
    shutil.copytree(
        ROOT / "nodeagent", source / "nodeagent", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", source)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
         "--wheel-dir", str(tmp_path), str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    [wheel] = tmp_path.glob("llmfleet_nodeagent-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith("/METADATA"))).decode()
        archive.extractall(tmp_path / "site")
    assert {name.split("/")[0] for name in names} == {
        "nodeagent",
        wheel.name.split("-py3")[0] + ".dist-info",
    }
    assert "django" not in metadata.lower()
    entry_points = next(name for name in names if name.endswith("entry_points.txt"))
    assert (
        "llmfleet-agent = nodeagent.__main__:main" in (tmp_path / "site" / entry_points).read_text()
    )
    result = subprocess.run(
        [sys.executable, "-m", "nodeagent", "--help"],
        cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "site"), "PATH": os.environ["PATH"]},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "usage: python -m nodeagent" in result.stdout
