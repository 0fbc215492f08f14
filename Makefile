# Two entry points for a fresh machine (see README, Quickstart):
#   make demo   set up .venv, train on the embedded synthetic data, evaluate on its test patients
#   make test   set up .venv (with the test extras) and run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch 2.13.0 is the CPU build that pip finds on these machines; any torch works elsewhere.
TORCH ?= torch==2.13.0

.PHONY: demo test setup setup-test clean

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
	$(PY) train.py --config configs/demo.toml --workdir runs/demo $$([ -d runs/demo/checkpoints ] && echo --resume)
	$(PY) evaluate.py --checkpoint runs/demo --split test --out runs/demo/eval-test

test: setup-test
	$(PY) -m pytest -q

clean:
	rm -rf runs/demo
