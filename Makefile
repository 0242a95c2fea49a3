# GAIR pipeline: `make demo` (set up + run the main job on the embedded sample) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export GAIR_DATA_ROOT ?= $(CURDIR)/gair_data
export DAGSTER_HOME ?= $(GAIR_DATA_ROOT)/dagster_home
# The UI of `make dev` listens on this host only (loopback); GAIR_UI_HOST=0.0.0.0 exposes it to the network.
GAIR_UI_HOST ?= 127.0.0.1
GAIR_UI_PORT ?= 3000
# `make dev` runs the UI in its own process group (setsid: the webserver, the daemon and the code servers) and
# records the group id in DEV_PGID; Ctrl-C is passed on to the group (SIGINT), `make dev-stop` ends it from elsewhere.
DEV_PGID = $(GAIR_DATA_ROOT)/dev.pgid
DEV_FOLLOW = pid=$$!; echo $$pid > "$(DEV_PGID)"; trap 'kill -INT -'$$pid' 2>/dev/null' INT TERM HUP; \
	wait $$pid; rc=$$?; wait $$pid 2>/dev/null; rm -f "$(DEV_PGID)"; exit $$rc

.PHONY: install demo evaluate ablation test test-fast test-deps dev dev-stop bench lint sample clean

install: $(STAMP)

# Editable install of every extra (dataset, train, pipelines + the dev tools), with every package pinned by
# constraints.txt. A training image needs only `pip install ".[train]"`, the data side ".[dataset]".
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: install  ## run the main job for every region of config/regions.yaml (default: the synthetic sample)
	$(BIN)/python -m pipelines.demo

evaluate: install  ## re-run the evaluation of the trained checkpoint (after `make demo`)
	$(BIN)/python -c "from pipelines.demo import prepare_dagster_home; from pathlib import Path; prepare_dagster_home(Path('$(GAIR_DATA_ROOT)'))"
	$(BIN)/dg launch --job evaluate_model

ablation: install  ## one tiny model per localiser at equal budget, benchmarked side by side (after `make demo`)
	$(BIN)/python -c "from pipelines.demo import prepare_dagster_home; from pathlib import Path; prepare_dagster_home(Path('$(GAIR_DATA_ROOT)'))"
	$(BIN)/dg launch --job ablate_localizers

test: install test-deps  ## the whole suite, slow tests included (CI runs this)
	$(BIN)/python -m pytest

# System packages of the tests (Debian): Chromium + chromedriver for tests/ui, the PostgreSQL server for tests/scale.
# Installed only when missing (root: CI); otherwise those tests skip and say why.
test-deps:
	@missing=""; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null 2>&1 || missing="$$missing chromium-driver"; \
	command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
	  || missing="$$missing postgresql"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing$$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	else echo "warning: missing$$missing (apt-get install as root); the tests that need them will skip"; fi

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

dev: install  ## Dagster UI on http://127.0.0.1:3000 (runs of `make demo` show up there; GAIR_UI_HOST/PORT)
	$(BIN)/python -c "from pipelines.demo import prepare_dagster_home; from pathlib import Path; prepare_dagster_home(Path('$(GAIR_DATA_ROOT)'))"
	@mkdir -p "$(GAIR_DATA_ROOT)"
	@echo "Dagster UI: http://$(GAIR_UI_HOST):$(GAIR_UI_PORT)  (stop: Ctrl-C, or make dev-stop from another shell)"
	setsid env --default-signal=INT $(BIN)/dagster dev -w workspace.yaml -h "$(GAIR_UI_HOST)" -p "$(GAIR_UI_PORT)" & $(DEV_FOLLOW)

dev-stop:  ## stop every process `make dev` started (its process group: webserver, daemon, code servers)
	@f="$(DEV_PGID)"; [ -f "$$f" ] || { echo "make dev is not running (no $$f)"; exit 0; }; \
	pgid=$$(cat "$$f"); \
	if [ -r /proc/$$pgid/cmdline ] && ! tr '\0' ' ' < /proc/$$pgid/cmdline | grep -q dagster; then \
	  echo "$$f names $$pgid, which is not the UI (a stale file): left alone"; rm -f "$$f"; exit 1; fi; \
	kill -INT -$$pgid 2>/dev/null; \
	for i in $$(seq 1 180); do kill -0 -$$pgid 2>/dev/null || break; sleep 0.5; done; \
	kill -KILL -$$pgid 2>/dev/null; rm -f "$$f"; echo "stopped make dev (process group $$pgid)"

bench: install  ## benchmarks; figures go to bench/results/*.json
	$(BIN)/python bench/pairing_bench.py
	$(BIN)/python bench/shards_bench.py
	$(BIN)/python bench/train_cpu.py
	$(BIN)/python bench/embed_bench.py
	$(BIN)/python bench/refresh_bench.py
	$(BIN)/python bench/faults_bench.py

lint: install  ## ruff (style + bug-catching rules), then mypy (config in pyproject.toml)
	$(BIN)/ruff check .
	$(BIN)/mypy

sample: install  ## (re)generate the synthetic sample region only
	$(BIN)/python -m gair_dataset.sample_region --force

clean:
	rm -rf $(GAIR_DATA_ROOT) .pytest_cache
