# Set-up and entry points. `make repro` and `make test` are all a newcomer needs.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
# Stages run `python ...` from dvc.yaml: make sure that is the project's interpreter.
export PATH := $(BIN):$(PATH)

FMNIST_LOCAL := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: help venv data-source repro pull lint test test-fast bench bench-scale mlflow-ui mlflow-server mlflow-user clean

help:
	@echo "make repro      set up .venv and run the whole pipeline (dvc repro)"
	@echo "make pull       set up .venv and fetch data, models and run cache from the DVC remote"
	@echo "make test       set up .venv and run the whole test suite"
	@echo "make test-fast  the tests that run no pipeline, server or browser (a few minutes)"
	@echo "make lint       ruff check (the rules in pyproject.toml)"
	@echo "make mlflow-ui  browse the runs at http://127.0.0.1:5000"
	@echo "make mlflow-server  the team tracking server (set MLFLOW_BACKEND_STORE_URI, MLFLOW_AUTH_ADMIN_PASSWORD, MLFLOW_FLASK_SERVER_SECRET_KEY; see docs/mlflow.md)"
	@echo "make mlflow-user MLFLOW_USER=alice PERMISSION=EDIT  add a user to the team server (an admin's MLFLOW_TRACKING_* set)"
	@echo "make bench      speed and accuracy figures on the real data (BENCH_ARGS=--seeds 1 for a quick look)"
	@echo "make bench-scale  how preprocessing, training and DVC cost grow with the data (docs/scale.md; ~20 min, root for memory limits)"

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile -c requirements.lock -e '.[test]'
	@# compileall uses every CPU where pip byte-compiles in one process; torch's test helpers are
	@# left out (one is Python 3.12 syntax), and a file that does not compile stops nothing.
	@$(BIN)/python -m compileall -q -j 0 -x '/torch/testing/_internal/' $(VENV)/lib >/dev/null || \
	  echo "venv: some files were not byte-compiled (Python compiles them when they are imported)"
	@touch $@

# The default mirror list starts with Debian's copy of Fashion-MNIST. Install it when
# apt-get can (root, Debian/Ubuntu); elsewhere the download stage uses the online mirrors.
data-source:
	@if [ -f $(FMNIST_LOCAL) ]; then \
	  echo "data source: local copy in $(dir $(FMNIST_LOCAL))"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "data source: installing Debian's dataset-fashion-mnist"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; } || \
	    echo "data source: apt-get could not install it; the download stage will use the online mirrors"; \
	else \
	  echo "data source: no local copy; the download stage will use the online mirrors"; \
	fi

repro: venv data-source
	dvc repro

# A teammate's first step after cloning: `dvc pull --run-cache`, explained in one line if it fails.
pull: venv
	$(BIN)/python -m imgclf.pull $(PULL_ARGS)

lint: venv
	$(BIN)/ruff check .

# One worker per CPU (the tests are CPU-bound), whole files each, in tests/conftest.py's order.
TEST_WORKERS ?= auto
test: venv data-source
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

# The inner loop: no pipeline run, server or browser (the `slow` marker, pyproject.toml).
test-fast: venv
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not slow"

mlflow-ui: venv
	@$(BIN)/python -m imgclf.tracking --ui http://127.0.0.1:5000
	$(BIN)/python -m imgclf.cli mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

# The team's tracking server: PostgreSQL for runs, the registry and its users; artifacts proxied.
mlflow-server: venv
	scripts/mlflow_server.sh $(MLFLOW_SERVER_ARGS)

# Add a user to the team server (or change their permission): READ, EDIT, MANAGE or NO_PERMISSIONS
# on this project's experiment and registered model. docs/mlflow.md.
PERMISSION ?= READ
mlflow-user: venv
	@test -n "$(MLFLOW_USER)" || { echo "error: MLFLOW_USER is not set; e.g. make mlflow-user MLFLOW_USER=alice PERMISSION=EDIT" >&2; exit 2; }
	$(BIN)/python -m imgclf.users "$(MLFLOW_USER)" --permission "$(PERMISSION)"

clean:
	rm -rf $(VENV) .pytest_cache

# Speed and accuracy figures on the real data (about 15 to 25 minutes on 2 cores). Each run is kept
# in bench/results/ and bench/docs.py rewrites docs/benchmarks.md and README's results table from them.
bench: venv data-source
	dvc repro preprocess
	$(BIN)/python bench/pipeline.py --record bench/results $(BENCH_ARGS)
	$(BIN)/python bench/docs.py

# How cost grows with the data (docs/scale.md): preprocess images/s and memory at 1x and 4x, training
# from memory-mapped splits (also under a cgroup memory limit of half their size, which needs root),
# near-duplicate detection's cost and recall, DVC on 70,000 files. One JSON document on stdout and in
# .bench/scale/scale.json; ~20 minutes on 2 cores (the near-duplicate section alone ~8).
bench-scale: venv data-source
	$(BIN)/python bench/scale.py $(BENCH_SCALE_ARGS)
