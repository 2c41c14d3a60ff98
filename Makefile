# Koala: the two commands a newcomer needs are `make run` and `make test`.
# Another interpreter, in its own venv: make test PYTHON=python3.13 VENV=.venv313
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=
APT    := $(shell command -v apt-get 2>/dev/null)
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test lint typecheck pytest services bench bench-quick clean

# A venv needs python3-venv on Debian; install it when the interpreter lacks it.
$(BIN)/python:
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  rm -rf $(VENV); \
	  [ -n "$(APT)" ] || { echo "python3 -m venv failed and apt-get is not available: install the venv module for $(PYTHON)"; exit 1; }; \
	  $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.run-deps: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[uvloop]'
	@touch $@

$(VENV)/.test-deps: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	@touch $@ $(VENV)/.run-deps

run: $(VENV)/.run-deps
	$(BIN)/koala dev examples/echo.py

# Servers the tests start for real (on free loopback ports, in temp dirs).
# etcd (placement driver) and PostgreSQL (storage); apt-get update runs only if one is missing.
services:
	@missing=""; \
	command -v etcd >/dev/null 2>&1 || missing="$$missing etcd-server"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 \
	  || missing="$$missing postgresql"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v prometheus >/dev/null 2>&1 || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
	  if [ -n "$(APT)" ]; then \
	    $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $$missing; \
	  else echo "install$$missing with your package manager (tests start them)"; exit 1; fi; \
	fi

lint: $(VENV)/.test-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.test-deps
	$(BIN)/mypy

pytest: $(VENV)/.test-deps services
	$(BIN)/pytest -q $(PYTEST_ARGS)

test: lint typecheck pytest

bench: $(VENV)/.test-deps
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench

bench-quick: $(VENV)/.test-deps
	$(BIN)/python -m bench --quick

clean:
	rm -rf $(VENV) .venv3* build *.egg-info .mypy_cache .ruff_cache .hypothesis
