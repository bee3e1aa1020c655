# llmfleet's commands. The README's two: `make run` and `make test`.

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

# The tests run against the real PostgreSQL and Redis of this machine (scripts/ensure-services.sh).
TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/llmfleet
TEST_REDIS_URL ?= redis://127.0.0.1:6379/15
TEST_ENV := DATABASE_URL=$(TEST_DATABASE_URL) REDIS_URL=$(TEST_REDIS_URL) \
	SECRET_KEY=tests-only-secret-key AGENT_TOKEN=tests-only-agent-token VAR_DIR=$(CURDIR)/var/test

.PHONY: run test lint services venv clean

venv: $(INSTALLED)

$(INSTALLED): requirements/controlplane.txt requirements/dev.txt
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: llmfleet needs Python 3.11" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements/dev.txt
	touch $@

## run: migrate, then run web, worker and beat together on this machine (Ctrl-C stops all)
run: $(INSTALLED)
	$(PY) -m controlplane.fleet

## lint: ruff, mypy, Django's checks and a migration check
lint: $(INSTALLED)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy .
	$(PY) manage.py check --fail-level WARNING
	$(PY) manage.py makemigrations --check --dry-run

## services: make sure PostgreSQL and Redis answer (installs and starts them if needed)
services:
	scripts/ensure-services.sh

## test: lint, then every test against PostgreSQL and Redis (ARGS=... passes pytest options)
test: lint services
	$(TEST_ENV) $(PY) -m pytest $(ARGS)

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
