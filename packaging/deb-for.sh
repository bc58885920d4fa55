#!/usr/bin/env bash
# `make deb SUITE=trixie`: build the package for another Debian release than this machine's, in a
# minimal root of that release (the native modules must match its python3; see build-deb.sh).
#
#   packaging/deb-for.sh SUITE      (root) -> build/SUITE/xenblk_<version>_<arch>.deb
#
# A pristine `debootstrap --variant=minbase SUITE` root is cached as a tarball in
# $XENBLK_DEB_CACHE (default /var/cache/xenblk-deb); each run unpacks it afresh, installs only the
# build dependencies from the Debian mirror this machine's apt uses, copies the working tree in
# (tracked + untracked-not-ignored files) and runs build-deb.sh there, in private mount and PID
# namespaces (nothing stays mounted, no process outlives the run).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
SUITE=${1:?usage: packaging/deb-for.sh SUITE (e.g. trixie)}
CACHE=${XENBLK_DEB_CACHE:-/var/cache/xenblk-deb}
PRISTINE=$CACHE/$SUITE-minbase.tar
RUN=$CACHE/$SUITE-run
OUT=$REPO/build/$SUITE
BUILD_DEPS="build-essential python3-dev python3-cffi python3-setuptools liburing-dev zlib1g-dev libzstd-dev libxen-dev"
BUILD_DEPS+=" binutils librbd-dev" # librbd-dev: the xenblk-rbd package

die() { echo "deb-for: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot)"
command -v debootstrap >/dev/null || {
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
}
mkdir -p "$CACHE"
exec 9>"$CACHE/$SUITE.lock"
flock 9

mirror=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
[ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list \
  /etc/apt/sources.list.d/*.list 2>/dev/null || true)
[ -n "$mirror" ] || die "no Debian mirror found in the apt sources"

safe_rm() {
  if findmnt -rn -o TARGET | grep -F "$1" >/dev/null; then die "something is mounted under $1; not removing it"; fi
  rm -rf --one-file-system "$1"
}

if [ ! -s "$PRISTINE" ]; then
  echo "deb-for: debootstrap $SUITE (minbase) from $mirror, once"
  safe_rm "$CACHE/$SUITE-bootstrap"
  unshare --mount --propagation private -- debootstrap --variant=minbase "$SUITE" "$CACHE/$SUITE-bootstrap" \
    "$mirror" >"$CACHE/$SUITE-debootstrap.log" 2>&1 || { tail -20 "$CACHE/$SUITE-debootstrap.log"; die "debootstrap failed"; }
  tar -C "$CACHE/$SUITE-bootstrap" --numeric-owner -cf "$PRISTINE.tmp" .
  mv "$PRISTINE.tmp" "$PRISTINE"
  safe_rm "$CACHE/$SUITE-bootstrap"
fi

safe_rm "$RUN"
mkdir -p "$RUN" "$CACHE/$SUITE-apt-archives/partial" # downloaded .debs are kept between runs
tar -C "$RUN" --numeric-owner -xpf "$PRISTINE"
cp -L /etc/resolv.conf "$RUN/etc/resolv.conf"
printf '#!/bin/sh\nexit 101\n' >"$RUN/usr/sbin/policy-rc.d" && chmod 755 "$RUN/usr/sbin/policy-rc.d"
mkdir -p "$RUN/root/xenblk"
git -C "$REPO" ls-files -co --exclude-standard -z |
  while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
  tar -C "$REPO" --null -T - -cf - | tar -C "$RUN/root/xenblk" -xpf -
# The commit being packaged, for the changelog and the maintainer field (no .git in the copy).
maintainer=$(git -C "$REPO" log -1 --format='%an <%ae>')
epoch=$(git -C "$REPO" log -1 --format=%ct)
commit=$(git -C "$REPO" rev-parse --short HEAD)$(git -C "$REPO" status --porcelain --untracked-files=no | grep -q . && echo " + local changes" || true)

cat >"$RUN/deb-for-steps.sh" <<'EOF'
set -euo pipefail
apt-get update -qq
apt-get install -y -qq --no-install-recommends $BUILD_DEPS >/tmp/apt.log 2>&1 || { tail -20 /tmp/apt.log; exit 1; }
cd /root/xenblk
packaging/build-deb.sh
EOF
unshare --mount --propagation private --pid --fork --kill-child -- bash -euo pipefail -c '
  R=$1 APT_CACHE=$2; shift 2
  mount -t proc proc "$R/proc"
  mount --bind /dev "$R/dev"
  mount --bind "$APT_CACHE" "$R/var/cache/apt/archives"
  chroot "$R" chown -R _apt:root /var/cache/apt/archives/partial
  chroot "$R" /usr/bin/env -i "$@" bash /deb-for-steps.sh
' deb-for "$RUN" "$CACHE/$SUITE-apt-archives" HOME=/root PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive \
  "BUILD_DEPS=$BUILD_DEPS" "DEB_MAINTAINER=$maintainer" "SOURCE_DATE_EPOCH=$epoch" "DEB_COMMIT=$commit"

mkdir -p "$OUT"
for deb in "$RUN"/root/xenblk/build/xenblk-rbd_*.deb "$RUN"/root/xenblk/build/xenblk_*.deb; do
  cp "$deb" "$OUT/"
  echo "build/$SUITE/$(basename "$deb")"
done
safe_rm "$RUN"
