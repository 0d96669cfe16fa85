# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test install infra lint format typecheck browser token bench clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || (echo "Python 3.11 is required ($(PYTHON) not found)"; exit 1)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

infra:
	@bash deploy/scripts/ensure-infra.sh

# Test tools from Debian's packages: headless Chromium for the portal's end-to-end tests (never a
# downloaded browser), docker-compose to validate docker-compose.yml where no Docker engine runs, and
# PgBouncer for the test of credits behind transaction pooling.
# Says what it is about to install first; NO_SYSTEM_PACKAGES=1 skips it (those tests are then skipped).
CHROMIUM ?= /usr/bin/chromium
APT_GET ?= apt-get
browser:
	@missing=""; test -x $(CHROMIUM) || missing="chromium chromium-driver"; \
	command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || missing="$$missing docker-compose"; \
	test -x /usr/sbin/pgbouncer || command -v pgbouncer >/dev/null || missing="$$missing pgbouncer"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	missing=$$(echo $$missing); skipped="the tests that need them (browser, docker-compose, PgBouncer) will be skipped"; \
	if [ -n "$(NO_SYSTEM_PACKAGES)" ]; then \
	  echo "make test: not installing $$missing (NO_SYSTEM_PACKAGES is set); $$skipped"; \
	elif ! command -v $(APT_GET) >/dev/null 2>&1; then \
	  echo "make test: cannot install $$missing: no apt-get on this machine; $$skipped"; \
	elif [ "$$(id -u)" != 0 ]; then \
	  echo "make test: cannot install $$missing: installing Debian packages needs root; $$skipped"; \
	else \
	  echo "make test: installing Debian packages for the tests: $$missing (apt-get; NO_SYSTEM_PACKAGES=1 skips this)"; \
	  ($(APT_GET) update -qq && DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -qq $$missing >/dev/null) \
	    || echo "make test: could not install $$missing; $$skipped"; \
	fi

test: install infra browser
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

run: install infra
	$(PY) deploy/run.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

typecheck: install
	$(VENV)/bin/mypy shared services

# Prints a portal sign-in URL for a development user: make token USER=alice
token: install
	@$(PY) -m shared.devtoken $(if $(filter command line,$(origin USER)),$(USER),demo-user)

bench: install infra
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .import_linter_cache .grimp_cache test-artifacts
