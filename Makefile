# Two commands for a fresh machine:  `make run` (the main job) and `make test` (the whole suite).
# Each bootstraps its own virtual environment in .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Flower writes its state under FLWR_HOME; keep it inside the project and keep Flower offline.
export FLWR_HOME := $(CURDIR)/.flwr
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

.PHONY: run test test-fast lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)  ## a simulated 5-clinic federation with DP: federated vs local-only vs pooled, report in runs/simulate
	$(BIN)/fednano simulate --out runs/simulate

test: $(STAMP)  ## lint, the layer contracts (pyproject [tool.importlinter]), the whole suite with slow tests
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/pytest

test-fast: $(STAMP)  ## unit tests only
	$(BIN)/pytest -m "not slow"

bench: $(STAMP)  ## the benchmarks behind BENCHMARKS.md
	$(BIN)/python benchmarks/simulator.py
	$(BIN)/python benchmarks/release_calibration.py

clean:
	rm -rf $(VENV) .flwr runs .pytest_cache
