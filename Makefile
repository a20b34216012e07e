# Two entry points: `make demo` (install + end-to-end prediction) and `make test` (install + test suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CSPML_HOME ?= $(CURDIR)/.cspml
export CSPML_HOME
export OPENBLAS_NUM_THREADS ?= 1

.PHONY: install demo test lint benchmark clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0  # first: otherwise chgnet pulls a multi-GB CUDA build
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/cspml demo --out out/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests workflows
	$(BIN)/ruff format --check src tests workflows

benchmark: $(STAMP)
	$(BIN)/cspml benchmark --protocol mp20bt --setting standard --workers 2 --json out/bench/mp20bt_standard.json --markdown out/bench/mp20bt_standard.md

clean:
	rm -rf $(VENV) out .cspml
