# Two entry points for a fresh machine (see README, Quickstart):
#   make demo   set up .venv, train on the embedded synthetic data, evaluate on its test patients
#   make test   set up .venv (with the test extras) and run the test suite
# and, for development, make test-fast: the suite without the tests marked slow (subprocess,
# multi-process and export-isolation tests).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch 2.13.0 is the CPU build that pip finds on these machines; any torch works elsewhere.
TORCH ?= torch==2.13.0

.PHONY: demo test test-fast setup setup-test clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PY) -m pip install -q "$(TORCH)" -e ".[test]"
	touch $@

setup: $(VENV)/.base
setup-test: $(VENV)/.test

demo: setup
	$(VENV)/bin/mednca train --config demo --workdir runs/demo --cpu-processes 1 $$([ -d runs/demo/checkpoints ] && echo --resume)
	$(VENV)/bin/mednca evaluate --checkpoint runs/demo --split test --out runs/demo/eval-test

# Two pytest-xdist workers, tests handed out one by one (a module fixture then runs once per
# worker; whole files per worker left one worker alone with the slow files for minutes).
XDIST := -n auto --maxprocesses 2 --dist load

test: setup-test
	$(PY) -m pytest -q $(XDIST)

test-fast: setup-test
	$(PY) -m pytest -q $(XDIST) -m "not slow"

clean:
	rm -rf runs/demo
