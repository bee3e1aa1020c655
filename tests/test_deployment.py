"""docker/ against the code, docs/deploying.md and .env.example (no container engine runs here).

The images, the compose file and the Kubernetes manifests name modules, management
commands, settings and ports; each is checked to exist and to be documented.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.core.management import get_commands

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = yaml.safe_load((DOCKER / "compose.yaml").read_text())
DEPLOYING = (ROOT / "docs" / "deploying.md").read_text()
ENV_EXAMPLE = set(re.findall(r"^([A-Z][A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M))
# Variables of third-party images, not llmfleet settings: set in compose.yaml itself.
IMAGE_OWN = {"POSTGRES_DB", "POSTGRES_USER"}
# Set by the Kubernetes manifests from the downward API, not by an operator.
DOWNWARD_API = {"POD_IP"}


def manifests() -> list[dict[str, Any]]:
    found = []
    for path in sorted((DOCKER / "k8s").glob("*.yaml")):
        found += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def containers() -> list[dict[str, Any]]:
    return [
        container
        for doc in manifests()
        if doc["kind"] in {"Deployment", "DaemonSet", "Job"}
        for container in doc["spec"]["template"]["spec"]["containers"]
    ]


def dockerfile_instruction(name: str, instruction: str) -> list[str] | None:
    """The last CMD or ENTRYPOINT of a Dockerfile, in exec form."""
    text = (DOCKER / name).read_text().replace("\\\n", " ")
    lines = [line for line in text.splitlines() if line.startswith(f"{instruction} ")]
    return json.loads(lines[-1].split(" ", 1)[1]) if lines else None


def check_command(argv: list[str]) -> None:
    """Whatever a command runs must exist: a module, a management command, an ASGI app."""
    if argv[:2] == ["sh", "-c"]:
        for part in argv[2].split("&&"):
            check_command(shlex.split(part))
        return
    words = argv[1:] if argv[0] in {"python", "python3"} else argv
    if words[0] == "-m":
        assert importlib.util.find_spec(words[1]) is not None, f"no module {words[1]}"
    elif words[0] == "manage.py":
        assert words[1] in get_commands(), f"no management command {words[1]}"
    elif words[0] == "daphne":
        module, _, attribute = words[-1].partition(":")
        assert hasattr(importlib.import_module(module), attribute), words[-1]
    elif words[0] == "celery":
        app = words[words.index("-A") + 1]
        assert importlib.util.find_spec(app) is not None
        assert words[words.index("-A") + 2] in {"worker", "beat", "inspect"}
    elif words[0] != "azurite-blob":
        raise AssertionError(f"a command this test does not know: {argv}")


def interpolated(value: Any) -> set[str]:
    return set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", json.dumps(value)))


def test_compose_services_and_volumes():
    services = COMPOSE["services"]
    assert set(services) == {"postgres", "redis", "azurite", "setup", "web", "worker", "loader",
                             "batcher", "beat", "agent", "agent-gpu"}  # fmt: skip
    assert set(COMPOSE["volumes"]) >= {"pgdata", "model-cache"}
    assert services["agent-gpu"]["profiles"] == ["gpu"]
    assert services["agent-gpu"]["runtime"] == "nvidia"
    assert "profiles" not in services["agent"]  # the CPU agent runs by default
    for name in ("web", "worker", "loader", "batcher", "beat"):
        assert services[name]["depends_on"]["setup"]["condition"] == (
            "service_completed_successfully"
        )
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name, service in services.items():
        assert "healthcheck" in service or name in {"agent", "agent-gpu"}, name


@pytest.mark.parametrize("name", sorted(COMPOSE["services"]))
def test_each_compose_service_is_in_the_docs_with_its_command_and_port(name):
    service = COMPOSE["services"][name]
    [row] = [line for line in DEPLOYING.splitlines() if line.startswith(f"| {name} |")]
    command = service.get("command")
    if isinstance(command, list):
        shown = command[2] if command[:2] == ["sh", "-c"] else " ".join(command)
        assert f"`{shown}`" in row, row
        check_command(command)
    for mapping in service.get("ports", []):
        assert f"| {mapping.split(':')[-1]} |" in row, row


def test_every_variable_in_compose_is_documented_in_env_example():
    names = set()
    for service in COMPOSE["services"].values():
        names |= set(service.get("environment", {})) | interpolated(service)
    assert "DATABASE_URL" in names, "the walk went stale"
    assert names - IMAGE_OWN <= ENV_EXAMPLE, names - IMAGE_OWN - ENV_EXAMPLE


@pytest.mark.parametrize(
    "dockerfile", ["controlplane.Dockerfile", "nodeagent.Dockerfile", "nodeagent-cpu.Dockerfile"]
)
def test_images_run_what_exists_as_a_non_root_user_without_secrets(dockerfile):
    text = (DOCKER / dockerfile).read_text()
    command = dockerfile_instruction(dockerfile, "ENTRYPOINT") or dockerfile_instruction(
        dockerfile, "CMD"
    )
    assert command is not None
    check_command(command)
    assert re.search(r"^USER 10001$", text, re.M)
    assert text.count("FROM ") >= 2  # multi-stage
    assert not re.search(r"(SECRET_KEY|AGENT_TOKEN|PASSWORD)=", text)
    for image in re.findall(r"^FROM (\S+)", text, re.M):
        assert image == "base" or (":" in image and not image.endswith(":latest")), image
    assert f"docker/{dockerfile}" in DEPLOYING


def test_kubernetes_containers_run_what_exists_with_documented_settings():
    for container in containers():
        if "command" in container:
            check_command(container["command"])
        for env in container.get("env", []):
            assert env["name"] in ENV_EXAMPLE | DOWNWARD_API, env["name"]
        assert "resources" in container
        assert container["resources"]["limits"], container["name"]
    for doc in manifests():
        if doc["kind"] in {"ConfigMap", "Secret"}:
            keys = set(doc.get("data", {})) | set(doc.get("stringData", {}))
            assert keys <= ENV_EXAMPLE, keys - ENV_EXAMPLE


def test_kubernetes_shape_the_issue_asks_for():
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for doc in manifests():
        by_kind.setdefault(doc["kind"], []).append(doc)
    beat = next(d for d in by_kind["Deployment"] if d["metadata"]["name"] == "llmfleet-beat")
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"]["type"] == "Recreate"
    [agents] = by_kind["DaemonSet"]
    pod = agents["spec"]["template"]["spec"]
    [agent] = pod["containers"]
    assert "nvidia.com/gpu" in agent["resources"]["limits"]
    assert pod["nodeSelector"]
    assert any("hostPath" in volume for volume in pod["volumes"])
    env = {item["name"]: item for item in agent["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["AGENT_ADVERTISE_URL"]["value"] == "http://$(POD_IP):8100"
    web = next(d for d in by_kind["Deployment"] if d["metadata"]["name"] == "llmfleet-web")
    [container] = web["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert by_kind["Secret"]
    assert by_kind["ServiceMonitor"][0]["spec"]["endpoints"][0]["path"] == "/metrics"
    listed = yaml.safe_load((DOCKER / "k8s" / "kustomization.yaml").read_text())["resources"]
    on_disk = {p.name for p in (DOCKER / "k8s").glob("*.yaml")}
    assert set(listed) == on_disk - {"kustomization.yaml", "servicemonitor.yaml"}
