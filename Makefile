# Two commands on a fresh machine: `make run` and `make test`. Each builds .venv when it is missing or stale.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA_ROOT ?= data/synthetic
SPLIT ?= 1

.PHONY: run catalog test test-fast lint format data bench bench-generalisation bench-service bench-streams bench-predict bench-predict-load bench-faults bench-input bench-instruments bench-diagnosis bench-memorise-real bench-lr-range gpu-check clean

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is required"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

$(DATA_ROOT)/annotations: | $(VENV)/.installed
	$(PY) -m cape.data.synthetic --out $(DATA_ROOT)

data: $(VENV)/.installed $(DATA_ROOT)/annotations

run: data  # the embedded default: SQLite, a local Redis, one worker, the API on http://127.0.0.1:8000
	$(PY) -m devtools.embedded

catalog: data
	$(PY) -m cape.data.catalog --dataset_root $(DATA_ROOT) --split $(SPLIT)

test: $(VENV)/.installed  # everything: unit tests, then the end-to-end tests (real servers, a browser)
	$(PY) -m pytest -q

test-fast: $(VENV)/.installed  # the unit tests alone (tests/unit): the inner loop, under 2 minutes on 2 cores
	$(PY) -m pytest -q tests/unit

lint: $(VENV)/.installed  # ruff's lint and format check (pyproject.toml), then the import contracts
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

format: $(VENV)/.installed  # apply ruff's formatting and safe fixes
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: data
	$(PY) -m benchmarks.synthetic_generation
	$(PY) -m benchmarks.single_image --dataset_root $(DATA_ROOT)

bench-generalisation: data  # about 15 minutes on 2 cores
	$(PY) -m benchmarks.generalisation --dataset_root $(DATA_ROOT)

bench-service: data  # the API and the stack under load, on SQLite and PostgreSQL (needs redis-server, postgresql)
	$(PY) -m benchmarks.api --dataset_root $(DATA_ROOT)
	$(PY) -m benchmarks.api --dataset_root $(DATA_ROOT) --database postgresql
	$(PY) -m benchmarks.load --dataset_root $(DATA_ROOT)

bench-streams: data  # 500 event streams (SSE) on one API process while a job trains (needs redis-server)
	$(PY) -m benchmarks.streams --dataset_root $(DATA_ROOT)

bench-predict: data  # predictions through HTTP: cold and warm latency, 8 clients, answers checked against validation
	$(PY) -m benchmarks.predict --dataset_root $(DATA_ROOT)

bench-predict-load: data  # predictions alone and beside a training job: p50, p99, 45 at once (needs redis-server)
	$(PY) -m benchmarks.predict_load

bench-faults: data  # the fault-injection tests, one line per fault (redis-server, postgresql, moto; about 10 minutes)
	$(PY) -m benchmarks.faults

bench-input: data  # the input pipeline alone on MP-100-sized photos (writes data/synthetic-mp100 once, ~300 MB)
	$(PY) -m benchmarks.input_pipeline

bench-instruments: data  # the training-health instruments' cost per step (single-image recipe, target <= 5 %)
	$(PY) -m benchmarks.instruments --dataset_root $(DATA_ROOT)

bench-diagnosis: data  # healthy runs and one per fault, with the figures the diagnosis's thresholds sit between
	$(PY) -m benchmarks.diagnosis --dataset_root $(DATA_ROOT)

bench-memorise-real: data  # every real photo of shared/real-photos memorised with the guide's recipe (about 40 minutes)
	$(PY) -m benchmarks.memorise_real

bench-lr-range: data  # the range test's suggestion used for the single-image recipe, 5 categories (about 5 minutes)
	$(PY) -m benchmarks.lr_range --dataset_root $(DATA_ROOT)

gpu-check: data  # on a CUDA machine: step time, memory, input pipeline, memorisation, instruments (~3-6 minutes)
	$(PY) -m benchmarks.gpu_check --dataset_root $(DATA_ROOT)

clean:
	rm -rf $(VENV) data *.egg-info
