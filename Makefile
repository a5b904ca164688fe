# The few commands people type. `make check` is what CI runs (through .ci/run).
PYTHON ?= python
LATEST_VENV ?= .venv-latest

.PHONY: setup check lint types browser test test-slow test-latest constraints bench bench-cache \
	bench-kernels demo

setup:  # the tested set of every dependency (constraints.txt), as CI installs it
	pip install torch==2.14.1 torchvision==0.29.1 -c constraints.txt -e '.[all,test]'

check: lint types test

lint:
	ruff check .
	ruff format --check .

types:
	mypy

browser:  # Debian's Chromium, for the dashboard's browser tests
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)

test: browser
	$(PYTHON) -m pytest

test-slow:
	$(PYTHON) -m pytest -m slow

# The newest release of every dependency (no constraints.txt) in a fresh venv, then make check:
# what a user's unpinned install gets today. torch stays at the pair that installs from local
# files here.
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install -U pip
	$(LATEST_VENV)/bin/pip install -U --upgrade-strategy eager torch==2.14.1 torchvision==0.29.1 -e '.[all,test]'
	PATH="$(abspath $(LATEST_VENV))/bin:$$PATH" $(MAKE) check PYTHON="$(abspath $(LATEST_VENV))/bin/python"

# Rewrite constraints.txt with the versions installed in $(PYTHON)'s environment. To move the
# pins to the newest releases once they pass: make test-latest && make constraints
# PYTHON=.venv-latest/bin/python
constraints:
	$(PYTHON) scripts/freeze_constraints.py

bench:
	$(PYTHON) scripts/bench_train.py --compare

bench-cache:
	$(PYTHON) scripts/bench_cache.py

bench-kernels:  # on a machine with an NVIDIA GPU
	$(PYTHON) scripts/bench_kernels.py

demo:
	saekit demo
