# xenblk — the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
PY := .venv/bin/python
export PATH := $(CURDIR)/.venv/bin:$(PATH)

.PHONY: setup native demo test test-fast test-debian13 lint test-py test-c fuzz bench xen-test xen-bench xen-restart clean

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
TEST_PARTS ?= setup lint test-c test-py xen-test test-debian13
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

# Real Xen 4.17 + Dom0 + a PV guest under QEMU (../shared/xen-vm); logs in build/xen-test/ and
# build/xen-restart/ (the second boot: kill -9 of the daemon under a verified guest workload, dm-error)
xen-test: setup
	tests/xen/run.sh test
	tests/xen/run.sh restart

# kill -9 of xenblk serve (twice) under a crc32c-verified guest fio; dm-error disk; build/xen-restart/
xen-restart: setup
	tests/xen/run.sh restart

# blkback vs qdisk vs xenblk inside one guest; table in bench/results/xen-<date>.txt
xen-bench: setup
	tests/xen/run.sh bench

# Debian package for this machine's release: build/xenblk_<version>_<arch>.deb (packaging/build-deb.sh)
.PHONY: deb
deb: setup
	packaging/build-deb.sh

clean:
	rm -rf build xenblk/_*.so .pytest_cache .mypy_cache .ruff_cache
