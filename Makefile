# overlaycni: the two set-up commands are `make lab` and `make test` (as root on Debian 12).
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
LAB_ARGS ?=

.PHONY: help deps lint test unit lab lab-down bench clean

help:
	@echo "make lab      install everything, bring up the default lab, check it, print a tour"
	@echo "make lint     ruff (src, tests, bench) and mypy (src), configured in pyproject.toml"
	@echo "make test     install everything, run the whole test suite"
	@echo "make unit     run the tests that need no root"
	@echo "make lab-down tear the default lab down"
	@echo "make bench    run the benchmarks in bench/"

deps:
	@scripts/install-deps.sh

lint: deps
	@echo "== ruff"
	$(BIN)/ruff check src tests bench
	@echo "== mypy"
	$(BIN)/mypy

test: deps
	$(BIN)/pytest $(PYTEST_ARGS)

unit: deps
	$(BIN)/pytest -m "not kernel and not etcd and not lab" $(PYTEST_ARGS)

lab: deps
	@scripts/lab-tour.sh $(LAB_ARGS)

lab-down: deps
	$(BIN)/overlaycni lab down

bench: deps
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .mypy_cache .ruff_cache src/*.egg-info
