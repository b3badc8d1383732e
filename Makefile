# Two commands for a fresh machine:  `make demo`  and  `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test setup system lint typecheck unit clean

demo: setup
	$(BIN)/citypulse up --simulate

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest -q

setup: system $(STAMP)

# Debian packages the embedded stack and the tests run (installed only when missing).
system:
	@bash deploy/setup-system.sh

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[embedded,dev,bench]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) .state .mypy_cache .pytest_cache .ruff_cache
