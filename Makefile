# overlaycni: the two set-up commands are `make lab` and `make test` (as root on Debian 12).
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# `make test` runs the suite on PYTEST_JOBS pytest-xdist workers (more than the 2 cores:
# lab and kernel tests mostly wait), then the tests marked serial alone
# (tests/conftest.py says why). PYTEST_JOBS=0 runs everything in one serial pytest.
PYTEST_JOBS ?= 4
LAB_ARGS ?=
# The native CNI plugin (src/overlaycni/cni/shim.c, the C twin of shim.py):
# built here with Debian's gcc, installed by `overlaycni install-cni`.
NATIVE_SHIM := build/overlaycni-shim
SHIM_SRC := src/overlaycni/cni/shim.c
SHIM_CFLAGS := -std=c11 -O2 -Wall -Wextra -Werror -Wshadow -Wconversion -Wformat=2 \
	-fstack-protector-strong -D_FORTIFY_SOURCE=2 -fPIE
SHIM_LDFLAGS := -pie -Wl,-z,relro,-z,now

.PHONY: help deps native-shim native-shim-asan lint test unit lab lab-down bench clean

help:
	@echo "make lab      install everything, bring up the default lab, check it, print a tour"
	@echo "make lint     ruff (src, tests, bench) and mypy (src), configured in pyproject.toml"
	@echo "make test     install everything, run the whole test suite"
	@echo "make unit     run the tests that need no root"
	@echo "make lab-down tear the default lab down"
	@echo "make bench    run the benchmarks in bench/"
	@echo "make native-shim       build $(NATIVE_SHIM), the C CNI plugin (part of every target above)"
	@echo "make native-shim-asan  the same with AddressSanitizer + UBSan, for fuzzing by hand"

deps:
	@scripts/install-deps.sh
	@$(MAKE) --no-print-directory native-shim

native-shim: $(NATIVE_SHIM)

# Written under a temporary name and renamed: a concurrent reader never runs half a binary.
$(NATIVE_SHIM): $(SHIM_SRC)
	@mkdir -p $(@D)
	$(CC) $(SHIM_CFLAGS) $(SHIM_LDFLAGS) -o $@.tmp$$$$ $< && mv -f $@.tmp$$$$ $@

native-shim-asan: $(SHIM_SRC)
	@mkdir -p build
	$(CC) -std=c11 -O1 -g -Wall -Wextra -Werror -fsanitize=address,undefined -fno-sanitize-recover=all \
		-fno-omit-frame-pointer -o build/overlaycni-shim-asan $<

lint: deps
	@echo "== ruff"
	$(BIN)/ruff check src tests bench
	@echo "== mypy"
	$(BIN)/mypy

test: deps
ifeq ($(PYTEST_JOBS),0)
	$(BIN)/pytest $(PYTEST_ARGS)
else
	@set -x; $(BIN)/pytest -n $(PYTEST_JOBS) --dist loadgroup --no-loadscope-reorder --serial skip $(PYTEST_ARGS); a=$$?; \
	$(BIN)/pytest --serial only $(PYTEST_ARGS); b=$$?; set +x; \
	case "$$a$$b" in 00|05|50) exit 0;; 55) exit 5;; esac; \
	[ $$a -ne 0 ] && [ $$a -ne 5 ] && exit $$a; exit $$b
endif

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
	rm -f $(NATIVE_SHIM) build/overlaycni-shim-asan
