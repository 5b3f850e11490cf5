# Two commands on a fresh machine: `make demo` and `make test`.
# GPU users: install your CUDA build of torch into .venv first (see README); it is kept.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_SPEC ?= torch==2.13.0
# the demo decides from what it sees (an autonomous survey); configs/twin-graphene-si.yaml is the raster
DEMO_CONFIG ?= configs/twin-survey.yaml

.PHONY: demo test lint install install-test broker browser clean bench

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, and only if the venv has none: a CUDA build installed by hand is never replaced
$(VENV)/.torch: | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PIP) install -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.torch
	$(PIP) install -e ".[test,files,bench,nion,batch]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# the MQTT tests start their own mosquitto on a free loopback port; this only installs it
broker:
	@command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq mosquitto; }

# the live page's browser test drives Debian's headless chromium with its chromedriver; this only installs them
browser:
	@{ command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; } || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium chromium-driver; }

demo: $(VENV)/.installed
	$(VENV)/bin/stemagent run --config $(DEMO_CONFIG)

# ruff (lint) and mypy (types, over the package's mapped folders) before the suite
lint: $(VENV)/.installed-test
	$(PY) -m ruff check .
	$(PY) tools/typecheck.py

test: lint broker browser
	$(PY) -m pytest -q

bench: $(VENV)/.installed-test
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
