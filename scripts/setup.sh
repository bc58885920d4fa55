#!/usr/bin/env bash
# Install what xenblk needs on Debian 12 (root): Debian packages, then a .venv
# with the Python packages and the native modules. Idempotent; fast when done.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBS=(
  build-essential pkg-config python3-venv
  xen-utils-4.17 xenstore-utils libxen-dev   # real xenstored (simulated host), xenstore-* oracles, UAPI headers
  liburing-dev zlib1g-dev libzstd-dev         # data plane and qcow2
  qemu-utils fio                              # qemu-img/qemu-io oracles, fio reference
  prometheus systemd                          # promtool, systemd-analyze
  python3-dev python3-cffi python3-setuptools # make deb: the native modules for the system python3
  python3-uvloop python3-structlog python3-prometheus-client python3-pyroute2  # the package's deps (test_deb)
  clang libclang-rt-14-dev                    # libFuzzer and sanitizers
)

missing=()
for p in "${DEBS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
stamp=build/venv.stamp
want=$(sha256sum pyproject.toml setup.py | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing Python packages into .venv"
  .venv/bin/pip install -q --upgrade pip setuptools wheel cffi
  .venv/bin/pip install -q --no-build-isolation -e ".[dev]"
  mkdir -p build && echo "$want" > "$stamp"
fi
.venv/bin/python native/build.py
