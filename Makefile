# xenblk — the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
PY := .venv/bin/python
export PATH := $(CURDIR)/.venv/bin:$(PATH)

.PHONY: setup native demo test test-fast test-debian13 lint test-py test-c fuzz bench xen-test xen-test-d12 xen-test-d13 xen-bench xen-restart xen-xl clean

setup:
	@scripts/setup.sh

native: setup

demo: setup
	$(PY) -m xenblk.demo

lint: setup
	.venv/bin/ruff check xenblk tests bench native packaging
	.venv/bin/ruff format --check xenblk tests bench native packaging
	.venv/bin/mypy xenblk

test-c: setup
	$(MAKE) -C native/tests run

test-py: setup
	$(PY) -m pytest -q tests

# each part timed (scripts/test-all.sh prints the table); a failed part does not hide the later ones.
# The real-Xen part boots each Dom0 flavour once (test + restart in one boot, tests/xen/dom0-all.sh).
# On a Debian 13 host: no d12 boot (its bookworm root cannot run code built against trixie's glibc)
# and no test-debian13 (the fast suite already ran on Debian 13 itself).
HOST_CODENAME := $(shell . /etc/os-release 2>/dev/null && echo $$VERSION_CODENAME)
ifeq ($(HOST_CODENAME),bookworm)
XEN_FLAVOURS ?= d12 d13
TEST_PARTS ?= setup lint test-c test-py test-debian13 $(addprefix xen-test-,$(XEN_FLAVOURS))
else
XEN_FLAVOURS ?= d13
TEST_PARTS ?= setup lint test-c test-py $(addprefix xen-test-,$(XEN_FLAVOURS))
endif
test:
	@scripts/test-all.sh $(TEST_PARTS)

# what runs without Xen: lint, C tests + fuzz smoke, pytest (test-debian13 runs this inside Debian 13)
test-fast:
	@scripts/test-all.sh setup lint test-c test-py

# make demo + make test-fast in a fresh Debian 13 root (debootstrap, cached in /var/cache/xenblk-debian13)
test-debian13:
	@scripts/debian13.sh

fuzz: setup
	$(MAKE) -C native/tests fuzz FUZZ_SECONDS=$${FUZZ_SECONDS:-300}

bench: setup
	$(PY) -m bench
	$(PY) -m bench.hostile --runtime 2
	$(PY) -m bench.qos --runtime 5
	$(PY) -m bench.nbd
	$(PY) -m bench.rbd

# Real Xen under QEMU (tests/xen/vm/xenvm, software emulation) in two Dom0 flavours:
# d12 = Debian 12 / Xen 4.17 / C xenstored, d13 = Debian 13 / Xen 4.20 / oxenstored under systemd.
# Per flavour one boot runs the xenblk test (tests/xen/dom0-test.sh) and then the restart test
# (kill -9 of the daemon under a verified guest workload, dm-error; dom0-restart.sh).
# Logs: build/xen-<flavour>-all/{test,restart}/. A failed flavour does not stop the others.
# make xen-xl: the xl lifecycle through block-xenblk (d13: the trixie package under systemd;
# tests/xen/dom0-xl.sh), one boot per flavour; not yet part of make test (README, "Using xenblk with xl").
XEN_FLAVOUR ?= $(firstword $(XEN_FLAVOURS))
xen-test: setup
	@rc=0; for f in $(XEN_FLAVOURS); do tests/xen/run.sh $$f all || rc=1; done; exit $$rc

xen-test-d12: setup
	tests/xen/run.sh d12 all

xen-test-d13: setup
	tests/xen/run.sh d13 all

# kill -9 of xenblk serve (twice) under a crc32c-verified guest fio; dm-error disk; both flavours
xen-restart: setup
	@rc=0; for f in $(XEN_FLAVOURS); do tests/xen/run.sh $$f restart || rc=1; done; exit $$rc

xen-xl: setup
	@rc=0; for f in $(XEN_FLAVOURS); do tests/xen/run.sh $$f xl || rc=1; done; exit $$rc

# blkback vs qdisk vs xenblk inside one guest (XEN_FLAVOUR, default: the first of XEN_FLAVOURS); table in bench/results/
xen-bench: setup
	tests/xen/run.sh $(XEN_FLAVOUR) bench

# Debian package for this machine's release: build/xenblk_<version>_<arch>.deb (packaging/build-deb.sh);
# SUITE=trixie (or another release): built in a minimal root of that release, build/<suite>/ (deb-for.sh)
.PHONY: deb
deb: setup
	@if [ -n "$(SUITE)" ]; then packaging/deb-for.sh "$(SUITE)"; else packaging/build-deb.sh; fi

clean:
	rm -rf build xenblk/_*.so tests/_*.so .pytest_cache .mypy_cache .ruff_cache
