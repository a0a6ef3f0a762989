# selfflow: every target builds or refreshes the virtual environment from the
# repository's own files first, so a fresh clone needs nothing installed by hand.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.selfflow-installed
RUNS ?= runs
export MLFLOW_TRACKING_URI ?= sqlite:///$(abspath $(RUNS))/mlflow.db

.PHONY: install system-deps browser-deps demo test test-fast bench bench-quick modalities ui ui-check clean help

help:
	@echo "make demo   - install, build digits shards, train Self-Flow-ready DiT on digits, log to MLflow"
	@echo "make test   - install, run the test suite"
	@echo "make bench  - install, run the benchmarks and regenerate BENCHMARKS.md"
	@echo "make modalities - install, train every modality's FM and Self-Flow preset, print the quality table"
	@echo "make ui     - serve the MLflow UI for $(RUNS)/ on http://127.0.0.1:5000 (one worker; Ctrl-C stops it)"
	@echo "make ui-check - open the MLflow UI in headless Chromium on a fresh store; screenshots in $(RUNS)/ui-check/"

install: system-deps $(STAMP)

# Debian's espeak-ng speaks the spoken-digits audio dataset; apt needs root (or sudo). A warm
# machine pays one `command -v`; a fresh one installs it (about 10 s), refreshing apt's lists only
# when the first try fails.
system-deps:
	@command -v espeak-ng >/dev/null || { \
	  sudo=$$(test "$$(id -u)" = 0 || echo sudo); \
	  echo "installing espeak-ng (apt)"; \
	  $$sudo apt-get install -y --no-install-recommends espeak-ng >/dev/null 2>&1 \
	  || { $$sudo apt-get update -qq && $$sudo apt-get install -y --no-install-recommends espeak-ng >/dev/null; } \
	  || { echo "cannot install espeak-ng: install Debian's espeak-ng package by hand" >&2; exit 1; }; }

# Re-runs only when the dependency files change: a warm `make` costs a stat.
$(STAMP): pyproject.toml setup.py constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test,sdvae,fid]'
	@touch $@

demo: install
	$(VENV)/bin/selfflow demo --runs $(RUNS)

# The browser check (tests marked `browser`) has its own target, `make ui-check`.
test: install
	$(PY) -m pytest -q -p no:cacheprovider -m "not browser" tests bench/tests

test-fast: install
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow and not browser" tests bench/tests

bench: install
	$(PY) -m bench --out BENCHMARKS.md

bench-quick: install
	$(PY) -m bench --quick --out BENCHMARKS.quick.md

# Issue 23's table: audio, video and digits presets, one run at a time (about two hours on 2 cores).
modalities: install
	$(PY) bench/modalities.py --runs $(RUNS)

ui: install
	$(VENV)/bin/selfflow ui --runs $(RUNS) --host 127.0.0.1 --port 5000

# Debian's chromium (apt) driven by Playwright from pip; Playwright never downloads a browser here.
UI_STAMP := $(VENV)/.selfflow-ui-check
browser-deps:
	@command -v chromium >/dev/null || { \
	  sudo=$$(test "$$(id -u)" = 0 || echo sudo); \
	  echo "installing chromium (apt)"; \
	  $$sudo apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 \
	  || { $$sudo apt-get update -qq && $$sudo apt-get install -y --no-install-recommends chromium >/dev/null; } \
	  || { echo "cannot install chromium: install Debian's chromium package by hand" >&2; exit 1; }; }

$(UI_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test,sdvae,fid,ui-check]'
	@touch $@

# A short run and a 2-trial sweep, served by `selfflow ui`, opened in headless Chromium.
ui-check: install browser-deps $(UI_STAMP)
	env -u MLFLOW_TRACKING_URI SELFFLOW_UI_CHECK_OUT=$(abspath $(RUNS))/ui-check \
	  $(PY) -m pytest -q -p no:cacheprovider -m browser tests/e2e/test_ui_browser.py

clean:
	rm -rf $(RUNS) data build *.egg-info
