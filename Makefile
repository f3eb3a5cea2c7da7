# The commands a newcomer needs.  `make run` and `make test` install what is
# missing first (Debian packages, then the virtualenv) and are safe to repeat.

VENV      := .venv
PYTHON    := $(VENV)/bin/python
PAXFS     := $(VENV)/bin/paxfs
STAMP     := $(VENV)/.installed
LOCAL_DIR := .paxfs-local
MOUNT_DIR := ./mnt
SEEDS     ?= 200
START     ?= 0
SUDO      := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# gcc and python3-dev build pyfuse3, which PyPI ships only as source.
DEBIAN_PACKAGES := fuse3 libfuse3-dev pkg-config python3-venv python3-dev gcc

.PHONY: help install system-packages run stop status test sim bench lint format

help:
	@echo "make run     install, start a local cluster on loopback, mount it at $(MOUNT_DIR)"
	@echo "make stop    unmount and stop what 'make run' started"
	@echo "make status  show the local cluster"
	@echo "make test    install, run the whole test suite"
	@echo "make sim     run Paxos simulation seeds START..START+SEEDS-1"
	@echo "make bench   run the benchmarks (print numbers)"
	@echo "make lint    ruff check + format check"

system-packages:
	@missing=""; \
	for package in $(DEBIAN_PACKAGES); do \
		dpkg -s $$package >/dev/null 2>&1 || missing="$$missing $$package"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory system-packages
	@test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q -e '.[test]'
	@touch $(STAMP)

install: system-packages $(STAMP)

run: install
	$(PAXFS) cluster up --dir $(LOCAL_DIR) --mount $(MOUNT_DIR)

stop: install
	$(PAXFS) cluster down --dir $(LOCAL_DIR)

status: install
	$(PAXFS) cluster status --dir $(LOCAL_DIR)

test: install
	$(VENV)/bin/pytest -q

sim: install
	$(PYTHON) -m tests.sim.run_seeds --seeds $(SEEDS) --start $(START)

bench: install
	@for bench in benchmarks/bench_*.py; do \
		module=$$(echo $$bench | sed 's|/|.|; s|\.py$$||'); \
		echo "== $$module"; $(PYTHON) -m $$module || exit 1; \
	done

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
