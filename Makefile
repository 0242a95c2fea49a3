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

.PHONY: install demo evaluate ablation test test-fast dev bench lint sample clean

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

test: install  ## the whole suite, slow tests included (CI runs this)
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

dev: install  ## Dagster UI on http://127.0.0.1:3000 (runs of `make demo` show up there; GAIR_UI_HOST/PORT)
	$(BIN)/python -c "from pipelines.demo import prepare_dagster_home; from pathlib import Path; prepare_dagster_home(Path('$(GAIR_DATA_ROOT)'))"
	$(BIN)/dagster dev -w workspace.yaml -h "$(GAIR_UI_HOST)" -p "$(GAIR_UI_PORT)"

bench: install  ## benchmarks; figures go to bench/results/*.json
	$(BIN)/python bench/pairing_bench.py
	$(BIN)/python bench/shards_bench.py
	$(BIN)/python bench/train_cpu.py
	$(BIN)/python bench/embed_bench.py

lint: install  ## ruff (style + bug-catching rules), then mypy (config in pyproject.toml)
	$(BIN)/ruff check .
	$(BIN)/mypy

sample: install  ## (re)generate the synthetic sample region only
	$(BIN)/python -m gair_dataset.sample_region --force

clean:
	rm -rf $(GAIR_DATA_ROOT) .pytest_cache
