# Two commands on a fresh Debian machine:  make demo   and   make test
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
PGR_PORT ?= 54329
export PGR_PORT
export POSTGRES_URL ?= postgresql://postgres@127.0.0.1:$(PGR_PORT)/postgres
export DAGSTER_HOME := $(CURDIR)/.dagster_home

.PHONY: demo dev test setup postgres install build-deps browser bench clean

# The CDC decoder is compiled at install (setup.py): a C compiler and Python's headers.
build-deps:
	@if ! command -v cc >/dev/null || [ ! -f "$$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq build-essential python3-dev >/dev/null; \
	  else echo "make: install a C compiler and Python headers first: sudo apt-get install build-essential python3-dev"; exit 1; fi; \
	fi

$(VENV)/.installed: pyproject.toml setup.py $(wildcard pg_replication/source/_*.[ch]) | build-deps
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

postgres:
	PGR_PORT=$(PGR_PORT) ./scripts/local-postgres

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $@

setup: install postgres $(DAGSTER_HOME)/dagster.yaml

demo: setup
	$(BIN)/python -m pg_replication.demo

# The UI test drives Debian's Chromium; without root to install it, that one test is skipped.
browser:
	@command -v chromium >/dev/null || if [ "$$(id -u)" = 0 ]; then \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "make: chromium is not installed; the UI test will be skipped"; fi

# The UI with the webserver and the daemon (the CDC sensor drains every 10 s): http://127.0.0.1:3000
dev: setup
	$(BIN)/dagster dev -h 127.0.0.1 -p 3000

# The suite runs in PYTEST_WORKERS parallel processes, each on a Postgres server of its own (ports
# PGR_PORT, PGR_PORT+1, ...: pg_replication_tests/servers.py), taking two tests at a time so that
# the slowest, handed out first (conftest.py), spread over them; PYTEST_WORKERS=0: one process.
# Four on two cores: many tests wait on Dagster's daemon and clocks (freshness windows, run
# monitoring), and a fourth worker uses the cores meanwhile.
PYTEST_WORKERS ?= 4
test: setup browser
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist load --maxschedchunk 2 $(PYTEST_ARGS)

bench: setup
	$(BIN)/python bench/backfill.py --rows 2000000
	$(BIN)/python bench/cdc.py --changes 1000000

clean:
	-./scripts/local-postgres stop
	-for d in .pg/worker-*; do [ -d "$$d" ] && PGR_INSTANCE="$${d#.pg/}" ./scripts/local-postgres stop; done
	rm -rf $(VENV) .pg .dagster_home warehouse.duckdb
