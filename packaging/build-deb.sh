#!/usr/bin/env bash
# `make deb`: build build/xenblk_<version>_<arch>.deb with dpkg-deb, for the Debian release this runs on.
#
# The package uses that release's python3 and its Debian Python packages (python3-cffi-backend,
# -uvloop, -structlog, -prometheus-client, -pyroute2); the native modules are compiled for that
# python3 (their file names carry its version), so the package is built per release: on Debian 12
# for Debian 12 (Python 3.11), on Debian 13 for Debian 13 (Python 3.13). Depends pins python3 to
# that minor version, so apt refuses a package built for another release instead of failing later.
# Build deps (installed by scripts/setup.sh): python3-dev python3-cffi python3-setuptools,
# liburing-dev zlib1g-dev libzstd-dev libxen-dev, build-essential; librbd-dev for xenblk-rbd.
#
# Two packages: xenblk, and xenblk-rbd = the Ceph RBD driver alone (xenblk._rbd, linked against librbd1 and
# librados2, ~25 MB of Ceph libraries most Xen hosts never use). xenblk Suggests it; without it an `rbd:`
# disk fails to open with "RBD support is not available ... install the xenblk-rbd package" in the device's
# error node and the log, and `xenblk serve` warns at start when rbd.allowed_pools names pools.
# DEB_RBD=auto (default): xenblk-rbd is built where librbd-dev is installed; yes: required; no: not built.
# Prints the path of each package built, xenblk's last.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${DEB_PYTHON:-/usr/bin/python3}
OUT=${DEB_OUT:-build}
VERSION=$("$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
ARCH=$(dpkg --print-architecture)
PYVER=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
PYNEXT=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1] + 1}")')
# Maintainer: $DEB_MAINTAINER, else the author of the commit being packaged.
MAINTAINER=${DEB_MAINTAINER:-$(git log -1 --format='%an <%ae>' 2>/dev/null || echo 'xenblk maintainers <xenblk@users.noreply.github.com>')}
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
PKGDIR=/usr/lib/python3/dist-packages # Debian's path for packaged modules of every python3 version
STAGE=$OUT/deb/xenblk_${VERSION}_${ARCH}
DEB=$OUT/xenblk_${VERSION}_${ARCH}.deb
RSTAGE=$OUT/deb/xenblk-rbd_${VERSION}_${ARCH}
RDEB=$OUT/xenblk-rbd_${VERSION}_${ARCH}.deb
case ${DEB_RBD:=auto} in
  auto) if [ -e /usr/include/rbd/librbd.h ]; then DEB_RBD=yes; else
    DEB_RBD=no; echo "build-deb: no librbd-dev here: xenblk-rbd (the RBD driver) is not built" >&2; fi ;;
  yes) [ -e /usr/include/rbd/librbd.h ] || { echo "build-deb: DEB_RBD=yes needs librbd-dev" >&2; exit 1; } ;;
  no) ;;
  *) echo "build-deb: DEB_RBD=$DEB_RBD: expected auto, yes or no" >&2; exit 1 ;;
esac

rm -rf "$STAGE" "$RSTAGE" "$RDEB"
mkdir -p "$STAGE/DEBIAN" "$STAGE$PKGDIR" "$STAGE/usr/bin" "$STAGE/usr/lib/systemd/system" \
  "$STAGE/etc/xenblk" "$STAGE/etc/xen/scripts" "$STAGE/usr/share/doc/xenblk"

# 1. the Python package (sources only: no build products of this checkout) and the native modules
tar -C . --exclude='__pycache__' --exclude='*.so' --exclude='*.pyc' -cf - xenblk | tar -C "$STAGE$PKGDIR" -xf -
"$PY" packaging/build_native.py "$STAGE$PKGDIR" >/dev/null
strip --remove-section=.comment --remove-section=.note --strip-unneeded "$STAGE$PKGDIR"/xenblk/*.so

# 2. the CLI, the unit, the config, the hotplug script, the docs
cat >"$STAGE/usr/bin/xenblk" <<EOF
#!/usr/bin/python3
import sys

from xenblk.cli import main

sys.exit(main())
EOF
chmod 0755 "$STAGE/usr/bin/xenblk"
# The unit as shipped in the checkout, with the packaged paths (pip installs to /usr/local/bin).
sed -e 's|/usr/local/bin/xenblk|/usr/bin/xenblk|g' \
  -e 's|^# Install: .*|# Installed by the xenblk package. Start: systemctl enable --now xenblk.|' \
  -e '/^# in \/etc\/systemd\/system\/, then/d' \
  systemd/xenblk.service >"$STAGE/usr/lib/systemd/system/xenblk.service"
grep -q '^ExecStart=/usr/bin/xenblk serve$' "$STAGE/usr/lib/systemd/system/xenblk.service"
# Every key commented out with its default (from the code itself): an upgrade's new defaults apply
# unless the admin set a key.
{
  echo "# /etc/xenblk/xenblk.toml: xenblk's configuration (see /usr/share/doc/xenblk/config.md)."
  echo "# Every key is shown commented out with its default; uncomment and edit to change one."
  echo "# After editing: systemctl reload xenblk (log.*, storage.*, dataplane.*, nbd.*, rbd.*, metrics.*) or restart."
  # what `xenblk config --defaults` prints, from the staged package (cd: not this checkout's), without
  # the CLI's runtime imports (structlog...), which a build root need not have
  (cd "$STAGE$PKGDIR" && "$PY" -c 'from xenblk.config import defaults_toml; print(defaults_toml(), end="")') |
    sed -e '1d' -e '/^\[/b' -e '/^#/b' -e '/^$/b' -e 's/^/# /'
} >"$STAGE/etc/xenblk/xenblk.toml"
chmod 0644 "$STAGE/etc/xenblk/xenblk.toml"
install -m 0755 contrib/xen/block-xenblk "$STAGE/etc/xen/scripts/block-xenblk"
install -m 0644 README.md docs/config.md docs/DESIGN.md "$STAGE/usr/share/doc/xenblk/"
cat >"$STAGE/usr/share/doc/xenblk/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: xenblk

Files: *
Copyright: $(date -u -d "@$SOURCE_DATE_EPOCH" +%Y) the xenblk authors (see the git history)
License: GPL-2.0-only
 On Debian systems the full text is in /usr/share/common-licenses/GPL-2.
EOF
if [ -n "${DEB_COMMIT:-}" ]; then # deb-for.sh: built in a copy without .git
  commit=$DEB_COMMIT dirty=
else
  commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
  dirty=$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo " + local changes" || true)
fi
cat <<EOF | gzip -9n >"$STAGE/usr/share/doc/xenblk/changelog.gz"
xenblk ($VERSION) unstable; urgency=medium

  * make deb: git $commit$dirty, Python $PYVER.

 -- $MAINTAINER  $(date -u -R -d "@$SOURCE_DATE_EPOCH")
EOF

# 3. the runtime libraries of the native modules, as packages of this release (no hard-coded sonames)
# The libraries each module names (DT_NEEDED), as the loader finds them; their own dependencies are their
# packages' business (dpkg-shlibdeps does the same), so xenblk-rbd names librbd1, not Ceph's whole closure.
lib_packages() { # DIR: the packages holding the libraries the DIR/*.so need
  local libpkgs
  libpkgs=$(for so in "$1"/*.so; do
    ldd "$so" | awk -v needed="$(readelf -d "$so" | sed -n 's/.*(NEEDED).*\[\(.*\)\]$/\1/p')" \
      'BEGIN { n = split(needed, l, "\n"); for (i = 1; i <= n; i++) want[l[i]] = 1 } $1 in want && $2 == "=>" {print $3}'
  done | sort -u | while read -r lib; do
    real=$(readlink -f "$lib")
    dpkg-query -S "$lib" 2>/dev/null || dpkg-query -S "$real"
  done | cut -d: -f1 | sort -u | tr '\n' ' ')
  [ -n "$libpkgs" ] || { echo "build-deb: cannot tell the library packages of $1/*.so" >&2; return 1; }
  echo "$libpkgs"
}
libpkgs=$(lib_packages "$STAGE$PKGDIR/xenblk")
depends="python3 (>= $PYVER~), python3 (<< $PYNEXT), python3-cffi-backend, python3-uvloop, python3-structlog"
depends+=", python3-prometheus-client, python3-pyroute2"
for p in $libpkgs; do depends+=", $p"; done

size=$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)
cat >"$STAGE/DEBIAN/control" <<EOF
Package: xenblk
Version: $VERSION
Architecture: $ARCH
Maintainer: $MAINTAINER
Installed-Size: $size
Depends: $depends
Recommends: xen-utils-common
Suggests: qemu-utils, xenblk-rbd
Section: admin
Priority: optional
Description: userspace Xen PV block backend (blkback) for Dom0
 xenblk serves blkfront guests from raw, qcow2, VHD and block-device images:
 a Python control plane (asyncio) and a C data plane (io_uring).
 Drives disks created by stock xl through the block-xenblk hotplug script.
 Ceph RBD images need the xenblk-rbd package.
 Built for Python $PYVER (this Debian release only).
EOF
printf '/etc/xenblk/xenblk.toml\n/etc/xen/scripts/block-xenblk\n' >"$STAGE/DEBIAN/conffiles"
cat >"$STAGE/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
  py3compile -p xenblk
  # Not enabled here: `systemctl enable --now xenblk` once /etc/xenblk/xenblk.toml says where images live.
  if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
fi
EOF
cat >"$STAGE/DEBIAN/prerm" <<'EOF'
#!/bin/sh
set -e
# Only on removal (the guests' disks then wait for a daemon that is gone). An upgrade leaves the running
# daemon alone; `systemctl restart xenblk` hands its devices over to the new one (daemon.on_stop).
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then systemctl stop xenblk.service || true; fi
py3clean -p xenblk
EOF
cat >"$STAGE/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
EOF
chmod 0755 "$STAGE/DEBIAN/postinst" "$STAGE/DEBIAN/prerm" "$STAGE/DEBIAN/postrm"

# 4. xenblk-rbd: the RBD driver module alone, for this xenblk version and this release's librbd1
if [ "$DEB_RBD" = yes ]; then
  mkdir -p "$RSTAGE/DEBIAN" "$RSTAGE$PKGDIR/xenblk" "$RSTAGE/usr/share/doc/xenblk-rbd"
  "$PY" packaging/build_native.py "$RSTAGE$PKGDIR" _rbd >/dev/null
  strip --remove-section=.comment --remove-section=.note --strip-unneeded "$RSTAGE$PKGDIR"/xenblk/*.so
  cp "$STAGE/usr/share/doc/xenblk/copyright" "$STAGE/usr/share/doc/xenblk/changelog.gz" \
    "$RSTAGE/usr/share/doc/xenblk-rbd/"
  rlibpkgs=$(lib_packages "$RSTAGE$PKGDIR/xenblk")
  rdepends="xenblk (= $VERSION)"
  for p in $rlibpkgs; do rdepends+=", $p"; done
  cat >"$RSTAGE/DEBIAN/control" <<EOF
Package: xenblk-rbd
Version: $VERSION
Architecture: $ARCH
Maintainer: $MAINTAINER
Installed-Size: $(du -sk --exclude=DEBIAN "$RSTAGE" | cut -f1)
Depends: $rdepends
Section: admin
Priority: optional
Description: Ceph RBD images for xenblk, the userspace Xen PV block backend
 The RBD driver of xenblk (librbd): disks named rbd:POOL/IMAGE[@SNAP],
 served read-write under RBD's exclusive lock. Configured in the [rbd]
 section of /etc/xenblk/xenblk.toml (see /usr/share/doc/xenblk/config.md).
EOF
fi

# Same timestamps for the same commit; root-owned files without fakeroot.
for st in "$STAGE" "$RSTAGE"; do
  [ -d "$st" ] || continue
  find "$st" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
  find "$st" -type d -exec chmod 0755 {} +
  # running the staged package (config generation, module checks) leaves bytecode behind: the
  # package ships sources only, python3 compiles them on the target
  find "$st" -name __pycache__ -type d -prune -exec rm -rf {} +
done
if [ "$DEB_RBD" = yes ]; then
  dpkg-deb --root-owner-group -Zxz --build "$RSTAGE" "$RDEB" >/dev/null
  echo "$RDEB"
fi
dpkg-deb --root-owner-group -Zxz --build "$STAGE" "$DEB" >/dev/null
echo "$DEB"
