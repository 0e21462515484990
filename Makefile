# Every target builds its own virtualenv, so a fresh clone needs only Python 3.11+ and make.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

## run: install, initialise the store (printing a one-time admin key if it is empty), serve on :5000
run: $(STAMP)
	$(PY) manage.py init
	$(PY) manage.py serve

## test: install and run the whole test suite
test: $(STAMP)
	$(PY) -m pytest

## bench: the per-request cost of authentication (see bench/README.md)
bench: $(STAMP)
	$(PY) bench/bench_auth.py

clean:
	rm -rf $(VENV) build *.egg-info
