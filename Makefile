# digestd — the README's two commands: `make demo` and `make test`.
# Each target creates the virtual environment it needs; nothing else must be installed
# beyond Python >= 3.11 and make.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck unit install clean bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/digestd demo --outbox ./demo-outbox

lint: $(STAMP)
	$(BIN)/ruff check digestd tests bench
	$(BIN)/ruff format --check digestd tests bench

typecheck: $(STAMP)
	$(BIN)/mypy --strict digestd

unit: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test: lint typecheck unit

bench: $(STAMP)
	$(BIN)/python bench/selection.py
	$(BIN)/python bench/delivery.py

clean:
	rm -rf $(VENV) demo-outbox .mypy_cache .ruff_cache .pytest_cache tests/artifacts
