# Two commands do all set-up on a fresh machine (see README.md):
#   make target   runs the main job (Target stage, MobileNet-0.25, COVID-CT, embedded MLflow store)
#   make test     runs the unit tests;  make integration  the slower ones;  make check  both;  make lint (ruff, import contract)
SHELL := /bin/bash
# Python 3.11, 3.12 or 3.13; another venv for another Python: make test PYTHON=python3.13 VENV=.venv-3.13
PYTHON ?= python3.11
VENV ?= .venv
# TensorFlow's CUDA build where nvidia-smi lists a GPU, else its CPU build (never both builds; a CPU-only
# machine never downloads the CUDA libraries: README, "The paper's grid on a GPU"). Force one: EXTRAS=gpu,test
EXTRAS ?= $(if $(shell nvidia-smi -L 2>/dev/null | grep -m 1 '^GPU'),gpu,cpu),test
PY := $(VENV)/bin/python
SHARED ?= $(abspath ../shared)
DATA_ROOT ?= $(if $(wildcard $(SHARED)/data),$(SHARED)/data,data)
export MSTL_SHARED := $(SHARED)
# `mlflow run --env-manager local` runs `python` from PATH: make it the venv's.
export PATH := $(abspath $(VENV))/bin:$(PATH)

BACKBONE ?= mobilenet_025
SPLIT ?= official
IMAGE_SIZE ?= 224
EPOCHS ?= 60
SEED ?= 0
EXPERIMENT ?= mstl
# the trained model (every Target cell of the grid) is also evaluated on the external development set,
# per patient, where it is present: a nested evaluate run. EXTERNAL= (empty) leaves it out
EXTERNAL ?= $(wildcard $(DATA_ROOT)/covid-ct-md)
EXTERNAL_PATIENTS ?= ctmd_[a-z]+_([^_]+)_s
EXTERNAL_ARGS = $(if $(EXTERNAL),-P external_sets=$(EXTERNAL) -P 'external_patient_pattern=$(EXTERNAL_PATIENTS)')
HOST ?= 127.0.0.1
PORT ?= 5000

.PHONY: venv weights target experiment server test integration check lint bench clean ui-docs

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11-3.13) on PATH, or set PYTHON=..." >&2; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

venv: $(VENV)/.installed

# Seed Keras's own cache (~/.keras, or $$KERAS_HOME when set) from ../shared, so weights=imagenet works
# offline for `make` and for `mlflow run` from the activated venv alike (users download as usual).
weights: venv
	@if [ -d "$(SHARED)/weights" ]; then $(PY) -m mstl.models prefetch mobilenet_025 --base-url "file://$(SHARED)/weights"; fi

target: weights
	$(PY) -m mstl.tracking ensure-experiment $(EXPERIMENT)
	$(VENV)/bin/mlflow run . -e target --env-manager local --experiment-name $(EXPERIMENT) \
	  -P data_root=$(DATA_ROOT) -P backbone=$(BACKBONE) -P split=$(SPLIT) \
	  -P image_size=$(IMAGE_SIZE) -P epochs=$(EPOCHS) -P seed=$(SEED) $(EXTERNAL_ARGS)

# The MSTL grid (backbones x imagenet/hard/soft x seeds x splits) in its cpu profile, then the report.
# GRID_WORKERS workers share the grid, each with an equal share of the cores as TensorFlow threads
# (two one-thread workers get more from a 2-core machine than one two-thread worker: docs/benchmarks.md).
GRID_EXPERIMENT ?= cpu-profile
GRID_SEEDS ?= 0,1,2,3,4
GRID_SPLITS ?= official,patient
GRID_WORKERS ?= 2
GRID_THREADS ?= $(shell n=$$(( $$(nproc) / $(GRID_WORKERS) )); echo $$(( n > 0 ? n : 1 )))
experiment: weights
	$(PY) -m mstl.tracking ensure-experiment $(GRID_EXPERIMENT)
	pids=""; \
	for worker in $$(seq $(GRID_WORKERS)); do \
	  $(VENV)/bin/mlflow run . -e experiment --env-manager local --experiment-name $(GRID_EXPERIMENT) \
	    -P profile=cpu -P data_root=$(DATA_ROOT) -P split=$(GRID_SPLITS) -P seeds=$(GRID_SEEDS) \
	    -P threads=$(GRID_THREADS) -P workers=$(GRID_WORKERS) \
	    $(EXTERNAL_ARGS) \
	    & pids="$$pids $$!"; \
	done; \
	failed=0; for pid in $$pids; do wait $$pid || failed=1; done; [ $$failed = 0 ]
	$(VENV)/bin/mlflow run . -e compare --env-manager local --experiment-name $(GRID_EXPERIMENT) \
	  -P search_experiment=$(GRID_EXPERIMENT) -P results_doc=docs/results.md

server: venv
	$(VENV)/bin/mlflow server --backend-store-uri sqlite:///mlflow.db --artifacts-destination ./mlartifacts \
	  --host $(HOST) --port $(PORT)

# the unit tests on both cores (pytest-xdist): about 70 s on a 2-core machine
test: weights
	$(PY) -m pytest -m "not integration" -q -n 2 tests

integration: weights
	$(PY) -m pytest -m integration -q -n 2 --dist loadfile --durations=25 tests

check: weights
	$(PY) -m pytest -q tests

# docs/ui.md's screenshots (docs/img/ui/*.png): the browser test of the MLflow UI on a tiny grid,
# saving what it sees (Debian's chromium and chromium-driver; minutes: it runs the grid first)
ui-docs: weights
	MSTL_UI_SHOTS=$(abspath docs/img/ui) $(PY) -m pytest -q -x tests/integration/test_ui.py

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

# Benchmarks (minutes; the soft-label scale run about 15): results are recorded in docs/benchmarks.md.
bench: weights
	$(PY) benchmarks/bench_pipeline.py --data-root $(DATA_ROOT)
	$(PY) benchmarks/bench_throughput.py
	$(PY) benchmarks/bench_prepare.py --slices 500
	$(PY) benchmarks/bench_soft_labels.py throughput
	$(PY) benchmarks/bench_soft_labels.py scale
	$(PY) benchmarks/soft_labels_real.py

clean:
	rm -rf .cache .pytest_cache mlruns
