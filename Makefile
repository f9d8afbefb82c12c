# make demo : set up .venv and run the demo (create, write, info, map, shrink, check)
# make test : install what the tests need (qemu-utils when root) and run the whole suite
VENV ?= .venv
PY := $(VENV)/bin/python
SHELL := /bin/bash

.PHONY: demo test venv qemu lint bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

qemu:
	@if ! command -v qemu-img >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-utils >/dev/null; \
	  else echo "qemu-img is missing: install Debian's qemu-utils (needs root)"; exit 1; fi; \
	fi
	@command -v qemu-img >/dev/null 2>&1 || { echo "qemu-img still missing"; exit 1; }

demo: venv
	$(PY) demo.py

lint: venv
	$(VENV)/bin/ruff check src tests bench fuzz demo.py
	$(VENV)/bin/mypy src
	$(VENV)/bin/lint-imports

test: venv qemu lint
	$(VENV)/bin/pytest -q -p no:cacheprovider tests

bench: venv qemu
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
