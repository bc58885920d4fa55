#!/usr/bin/env bash
# Install what xenblk needs on Debian 12 or 13 (root): Debian packages, then a .venv
# with the Python packages and the native modules. Idempotent; fast when done.
set -euo pipefail
cd "$(dirname "$0")/.."

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
updated=
apt_update() { [ -n "$updated" ] || { apt-get update -qq; updated=1; }; }

# Versioned names come from what is installed or, on a fresh machine, from what apt offers
# (Debian 12: xen-utils-4.17, clang 14; Debian 13: xen-utils-4.20, clang 19), never from a fixed list.
xen_utils() {  # sets $xen
  local p
  p=$(dpkg-query -W -f='${Package} ${Status}\n' 'xen-utils-[0-9]*' 2>/dev/null |
    awk '$1 ~ /^xen-utils-[0-9.]+$/ && /install ok installed/ {print $1}' | sort -V | tail -1 || true)
  if [ -z "$p" ]; then
    apt_update
    p=$(apt-cache pkgnames xen-utils- | grep -E '^xen-utils-[0-9.]+$' | sort -V | tail -1 || true)
  fi
  [ -n "$p" ] || { echo "setup: no xen-utils-<version> package in the apt sources" >&2; exit 1; }
  xen=$p
}
clang_rt() {  # sets $clang_rt: libFuzzer and the sanitizer runtimes of the clang that `clang` is
  local n=
  if installed clang && command -v clang >/dev/null; then
    n=$(clang -dumpversion | cut -d. -f1)
  else
    apt_update
    n=$(apt-cache depends clang | sed -n 's/^ *Depends: clang-\([0-9][0-9]*\)$/\1/p' | head -1)
  fi
  [ -n "$n" ] || { echo "setup: cannot tell which clang-N the clang package is" >&2; exit 1; }
  clang_rt=libclang-rt-$n-dev
}
xen_utils
clang_rt

DEBS=(
  build-essential pkg-config python3-venv
  "$xen" xenstore-utils libxen-dev           # real C xenstored (simulated host), xenstore-* oracles, UAPI headers
  liburing-dev zlib1g-dev libzstd-dev         # data plane and qcow2
  qemu-utils fio                              # qemu-img/qemu-io oracles, fio reference
  libvhdi-utils python3-libvhdi               # vhdiinfo and libvhdi's Python binding: VHD oracles
  libnbd-bin nbdkit python3-libnbd            # nbdinfo/nbdcopy/nbdsh: NBD export oracles; nbdkit: bench reference
  prometheus systemd                          # promtool, systemd-analyze
  python3-dev python3-cffi python3-setuptools # make deb: the native modules for the system python3
  python3-uvloop python3-structlog python3-prometheus-client python3-pyroute2  # the package's deps (test_deb)
  clang "$clang_rt"                           # libFuzzer and sanitizers
  librbd-dev ceph-mon ceph-osd ceph-mgr ceph-common  # the RBD driver (xenblk._rbd) and its test cluster
)

missing=()
for p in "${DEBS[@]}"; do
  installed "$p" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt_update
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
