# Every target builds its own virtualenv, so a fresh clone needs only Python 3.11+ and make.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: run test bench bench-http clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# The service alone for `run`; the test tools (schemathesis, playwright, ...) for `test`.
$(VENV)/.installed-run: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[postgres,redis]'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

## run: install, initialise the store (printing a one-time admin key if it is empty), serve on
## :5000 (or PORT=8080; KEYGATE_HOST, KEYGATE_PORT and KEYGATE_WORKERS are read too)
run: $(VENV)/.installed-run
	$(PY) manage.py init
	$(PY) manage.py serve $(if $(PORT),--port $(PORT))

## test: install and run the whole test suite. pytest rewrites the asserts of its plugins'
## ~350 modules in every process; where PYTHONDONTWRITEBYTECODE is set it may never keep the
## result, which costs each xdist worker ~4 s: the suite keeps it.
test: $(VENV)/.installed-test
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest

## bench: the per-request cost of authentication; bench-http: the server against its peers
## over real sockets (needs wrk); see bench/README.md
bench: $(VENV)/.installed-test
	$(PY) bench/bench_auth.py

bench-http: $(VENV)/.installed-test
	$(PY) bench/bench_http.py

clean:
	rm -rf $(VENV) build *.egg-info
