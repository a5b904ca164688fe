# The few commands people type. `make check` is what CI runs (through .ci/run).
PYTHON ?= python

.PHONY: setup check lint types browser test test-slow bench bench-cache bench-kernels demo

setup:
	pip install torch==2.14.1 torchvision==0.29.1 -e '.[all,test]'

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

bench:
	$(PYTHON) scripts/bench_train.py --compare

bench-cache:
	$(PYTHON) scripts/bench_cache.py

bench-kernels:  # on a machine with an NVIDIA GPU
	$(PYTHON) scripts/bench_kernels.py

demo:
	saekit demo
