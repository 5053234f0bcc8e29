# `make test` and `make demo` each build .venv on first use (pinned CPU packages), then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo lint bench-cpu clean

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints-cpu.txt -e ".[dev,triton]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/hla demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench-cpu: $(STAMP)
	$(BIN)/python benchmarks/kda_cpu.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
