# All set-up is here: `make run` and `make test` create the environment when needed.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTHON ?= python3
STAMP  := $(VENV)/.installed-$(shell cat requirements-lock.txt pyproject.toml | sha1sum | cut -c1-12)
CONFIG ?= configs/quickstart.yaml

.PHONY: run test bench bench-quick bench-all env clean-store

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

# Benchmarks (bench/run.py; `$(PY) -m bench.run --mode MODE --list` shows a plan):
#   make bench        the measured figures that fit this machine, about an hour
#                     -> bench/results/*.json, BENCHMARKS.md
#   make bench-quick  every bench at tiny sizes in ~5-8 min, to check the figures' shape
#                     -> bench/results/quick/*.json, bench/results/quick/BENCHMARKS.md
#   make bench-all    bench + reference-sized zoo runs + leave-one-city-out tables (hours;
#                     resumable: run it again after an interruption)
bench: $(STAMP)
	$(PY) -m bench.run --mode full

bench-quick: $(STAMP)
	$(PY) -m bench.run --mode quick

bench-all: $(STAMP)
	$(PY) -m bench.run --mode all

clean-store:
	rm -rf stgray-store
