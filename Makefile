# fireflyer: `make demo` and `make test` work on a fresh machine; both install what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
EXTRAS ?= dev,torch,mpi,postgres,fuse,sim
# Reinstall when the packaging or a C source changes.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml setup.py $(wildcard */*.c */*/*.c) 2>/dev/null | md5sum | cut -c1-10)
PYTEST_ARGS ?=
# Two workers, one test file each at a time (module-scoped clusters stay in one process): most tests wait
# on processes and sockets, so two workers halve the suite's time on 2 cores. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2

.PHONY: all install demo test bench bench-quick lint format clean sysdeps

all: test

$(STAMP): pyproject.toml setup.py
	@bash scripts/sysdeps.sh
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	@$(VPY) -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
	@echo "installing fireflyer[$(EXTRAS)] into $(VENV) ..."
	@$(VPY) -m pip install -q -e '.[$(EXTRAS)]' 2>&1 | grep -v '^WARNING: Location' || true
	@$(VPY) -c 'import network, hfreduce, haiscale, fs3, haiplatform, deploy' || { echo "install failed" >&2; exit 1; }
	@rm -f $(VENV)/.installed-*; touch $@

install: $(STAMP)

sysdeps:
	@bash scripts/sysdeps.sh

demo: $(STAMP)
	$(VPY) -m deploy.demo $(if $(filter 1 yes true,$(NETNS)),--netns)

test: $(STAMP)
	$(VPY) -m pytest $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile) $(PYTEST_ARGS) \
	  $(if $(filter 1 yes true,$(NETNS)),--netns)

bench: $(STAMP)
	@bash scripts/sysdeps.sh slurm-wlm
	@set -e; for b in bench/[a-z]*.py; do echo "== $$b"; $(VPY) $$b $(BENCH_ARGS); done

bench-quick:
	@$(MAKE) bench BENCH_ARGS=--quick

lint: $(STAMP)
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
