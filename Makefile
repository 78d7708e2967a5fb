# The two commands of the README. Each creates .venv and installs the project when needed, so either
# works by itself on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_LOG ?= $(or $(MTL_DATA_DIR),data)/demo.log

.PHONY: demo test lint format bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch==2.13.0 is pinned in pyproject.toml: pip takes the CPU wheel from the machine's wheel folder.
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

## Run the main job end to end on the embedded defaults (SQLite warehouse under $$MTL_DATA_DIR, default ./data).
demo: $(STAMP)
	@mkdir -p $(dir $(DEMO_LOG))
	MLFLOW_DISABLE_TELEMETRY=true $(BIN)/mtl demo 2> $(DEMO_LOG) || (echo "demo failed; the log is $(DEMO_LOG)"; tail -n 30 $(DEMO_LOG); exit 1)

## Run the whole test suite (needs the local PostgreSQL server at 127.0.0.1:5432).
test: $(STAMP)
	MLFLOW_DISABLE_TELEMETRY=true $(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check mtl_core dags tests bench
	$(BIN)/ruff format --check mtl_core dags tests bench

## Format the code the way `make lint` checks it.
format: $(STAMP)
	$(BIN)/ruff format mtl_core dags tests bench
	$(BIN)/ruff check --fix --select I mtl_core dags tests bench

bench: $(STAMP)
	$(BIN)/python bench/simulate_extract.py

clean:
	rm -rf $(VENV) data .pytest_cache
