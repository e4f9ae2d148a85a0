# Atrium developer entry points. `make run` serves the API on the embedded defaults (SQLite,
# in-memory cache and queue); `make test` installs everything and runs the same checks as CI.
# ATRIUM_VENV picks the virtualenv (default .venv); every target bootstraps it first, from
# uv.lock (docs/dependencies.md: lock, lowest, canary).

SHELL := /bin/bash
VENV ?= $(or $(ATRIUM_VENV),.venv)
export ATRIUM_VENV := $(VENV)

.PHONY: run test soak lint migrate worker bench clean bootstrap services scale-out lock lowest canary

# Arguments go to `atrium serve`: make run ARGS='--port 8001' (or '--host 0.0.0.0 --workers 2').
run:
	scripts/serve $(ARGS)

test:
	scripts/test

# The long runs kept out of `make test` (pytest marker soak): e.g. 1,000 sign-ups on RabbitMQ with kills.
soak:
	scripts/test -m soak

bootstrap:
	scripts/bootstrap

services:
	scripts/services

# Re-resolve uv.lock after editing pyproject.toml's dependencies: make lock ARGS='--upgrade-package fastapi'
lock:
	scripts/lock $(ARGS)

# Every test on the lowest release each range in pyproject.toml allows (a throwaway venv).
lowest:
	scripts/lowest $(ARGS)

# The suites on the newest releases, uv.lock ignored (a throwaway venv); reports what broke.
canary:
	scripts/canary $(ARGS)

lint: bootstrap
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

migrate: bootstrap
	$(VENV)/bin/atrium migrate

worker: bootstrap
	$(VENV)/bin/atrium worker

bench:
	@if [ -f scripts/bench ]; then scripts/bench; else echo "no benchmark yet"; exit 1; fi

# nginx -> 2 API processes + 2 workers on this machine, in the foreground (Ctrl-C stops it all).
# Arguments: make scale-out ARGS='--port 8088 --items 10'
scale-out: bootstrap services
	deploy/scale-out $(ARGS)

clean:
	rm -rf .venv var build dist *.egg-info
	rm -rf .pytest_cache .ruff_cache .hypothesis .import_linter_cache .mypy_cache
	find . \( -path ./.git -o -path './.venv*' \) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
