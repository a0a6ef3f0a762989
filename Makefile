# selfflow: every target builds or refreshes the virtual environment from the
# repository's own files first, so a fresh clone needs nothing installed by hand.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.selfflow-installed
RUNS ?= runs
export MLFLOW_TRACKING_URI ?= sqlite:///$(abspath $(RUNS))/mlflow.db

.PHONY: install demo test test-fast bench bench-quick ui clean help

help:
	@echo "make demo   - install, build digits shards, train Self-Flow-ready DiT on digits, log to MLflow"
	@echo "make test   - install, run the test suite"
	@echo "make bench  - install, run the benchmarks and regenerate BENCHMARKS.md"
	@echo "make ui     - serve the MLflow UI for $(RUNS)/ on http://127.0.0.1:5000"

install: $(STAMP)

# Re-runs only when the dependency files change: a warm `make` costs a stat.
$(STAMP): pyproject.toml setup.py constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	@touch $@

demo: install
	$(VENV)/bin/selfflow demo --runs $(RUNS)

test: install
	$(PY) -m pytest -q -p no:cacheprovider tests

test-fast: install
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests

bench: install
	$(PY) -m selfflow.platform.bench --out BENCHMARKS.md

bench-quick: install
	$(PY) -m selfflow.platform.bench --quick --out BENCHMARKS.quick.md

ui: install
	$(VENV)/bin/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) --host 127.0.0.1 --port 5000

clean:
	rm -rf $(RUNS) data build *.egg-info
