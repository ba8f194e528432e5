# All set-up is here: `make run` and `make test` create the environment when needed.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTHON ?= python3
STAMP  := $(VENV)/.installed-$(shell cat requirements-lock.txt pyproject.toml | sha1sum | cut -c1-12)
CONFIG ?= configs/quickstart.yaml

.PHONY: run test bench bench-quick env clean-store

env: $(STAMP)

$(STAMP): requirements-lock.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-lock.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.installed-* && touch $@

run: $(STAMP)
	$(VENV)/bin/stgray run $(CONFIG)

test: $(STAMP)
	RAY_AUTH_MODE=disabled OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m bench.run --mode full

bench-quick: $(STAMP)
	$(PY) -m bench.run --mode quick

clean-store:
	rm -rf stgray-store
