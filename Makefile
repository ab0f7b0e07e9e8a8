# Two commands on a fresh machine: `make run` and `make test`. Each builds .venv when it is missing or stale.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA_ROOT ?= data/synthetic
SPLIT ?= 1

.PHONY: run test data bench clean

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is required"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

$(DATA_ROOT)/annotations: | $(VENV)/.installed
	$(PY) -m cape.data.synthetic --out $(DATA_ROOT)

data: $(VENV)/.installed $(DATA_ROOT)/annotations

run: data
	$(PY) -m cape.data.catalog --dataset_root $(DATA_ROOT) --split $(SPLIT)

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: data
	$(PY) benchmarks/synthetic_generation.py

clean:
	rm -rf $(VENV) data *.egg-info
