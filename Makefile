# Every target bootstraps its own .venv; nothing relies on something installed by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

## make demo: a file flows inbox/ -> done/ against the built-in emulator, no API key.
demo: $(STAMP)
	$(BIN)/batchd demo

## make test: lint, format check, mypy --strict, and the whole test suite.
test: lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# Two processes, a test file each (--dist loadfile keeps a file's shared servers in one).
unit: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

## make bench: every benchmark at full size (slow; not part of CI).
bench: $(STAMP)
	$(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
