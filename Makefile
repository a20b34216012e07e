# Two entry points: `make demo` (install + end-to-end prediction) and `make test` (install + test suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CSPML_HOME ?= $(CURDIR)/.cspml
export CSPML_HOME
export OPENBLAS_NUM_THREADS ?= 1
# Extras that `make install` adds to the core (pyproject.toml lists them all; sevennet and mp stay optional).
EXTRAS ?= ml,fireworks,remote,docs,test
# torch goes in first, alone: the CPU build the constraints name; otherwise chgnet pulls a multi-GB CUDA build.
TORCH ?= torch
SCRATCH := $(CURDIR)/build/constraints-venv

.PHONY: install demo test lint benchmark constraints clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt $(TORCH)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/cspml demo --out out/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests workflows benchmarks
	$(BIN)/ruff format --check src tests workflows benchmarks

benchmark: $(STAMP)
	$(BIN)/python -m benchmarks csp --protocol mp20bt --setting standard --workers 2 --json out/bench/mp20bt_standard.json --markdown out/bench/mp20bt_standard.md

# Rewrites constraints.txt from a scratch venv holding the newest releases the ranges in pyproject.toml allow
# (no constraints), keeping the file's comment header. A newer torch: `make constraints TORCH=torch==X.Y.Z`.
constraints:
	rm -rf $(SCRATCH)
	$(PYTHON) -m venv $(SCRATCH)
	$(SCRATCH)/bin/python -m pip install -q --upgrade pip
	$(SCRATCH)/bin/python -m pip install -q $(if $(filter torch,$(TORCH)),"$$(grep '^torch==' constraints.txt)",$(TORCH))
	$(SCRATCH)/bin/python -m pip install -q ".[$(EXTRAS)]"
	{ grep '^#' constraints.txt; $(SCRATCH)/bin/python -m pip freeze --exclude cspml-flows | sed 's/+cpu$$//'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf $(SCRATCH)

clean:
	rm -rf $(VENV) out .cspml
