#!/usr/bin/env bash
# `make test-debian13`: the quick start on Debian 13 (trixie) without a Debian 13 machine.
#
# A pristine trixie minbase root (debootstrap from the Debian mirror this host's apt uses) is cached as a tarball;
# each run unpacks it afresh, copies the working tree into it (tracked + untracked-not-ignored files, so the host's
# .venv and build/ stay out), and runs `make demo` and `make test-fast` in it as root: a chroot in its own mount and
# PID namespaces with /proc, /sys, /dev, /dev/pts and /dev/shm mounted. The namespaces make cleanup certain: their
# mounts and any process left behind die with them, whatever way the run ends; nothing is ever mounted in the
# host's namespace. So every run proves that scripts/setup.sh installs everything on a pristine Debian 13; only the
# downloads of .debs are cached, so a cached run costs the installs, not the apt downloads.
#
#   scripts/debian13.sh                  (root; cache in $XENBLK_DEBIAN13_CACHE, default /var/cache/xenblk-debian13)
#   XENBLK_DEBIAN13_STEPS='make demo'    what to run in the copy (default: make demo && make test-fast)
#   XENBLK_DEBIAN13_REFRESH=1            debootstrap the pristine root again
#   XENBLK_DEBIAN13_REUSE=1              (debugging only) keep the last run's root, just copy the tree in again
# After a failure the run's root stays in $CACHE/run for a look (removed by the next run); after a pass it goes.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
CACHE=${XENBLK_DEBIAN13_CACHE:-/var/cache/xenblk-debian13}
SUITE=trixie
PRISTINE=$CACHE/$SUITE-minbase.tar
RUN=$CACHE/run
STEPS=${XENBLK_DEBIAN13_STEPS:-make demo && make test-fast}
t_all=$SECONDS

say() { echo "debian13: $*"; }
die() { echo "debian13: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot, mounts)"
[ "$(uname -m)" = x86_64 ] || die "x86_64 only"
for tool in debootstrap unshare; do
  command -v "$tool" >/dev/null || {
    say "installing debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap util-linux >/dev/null
  }
done
mkdir -p "$CACHE"
exec 9>"$CACHE/lock"
flock -n 9 || { say "another run holds $CACHE/lock; waiting"; flock 9; }

# The mirror this host's apt already uses (deb822 first, then one-line sources), as shared/xen-vm does.
mirror=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
[ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list \
  /etc/apt/sources.list.d/*.list 2>/dev/null || true)
[ -n "$mirror" ] || die "no Debian mirror found in the apt sources"

# Mounts are only ever made inside the namespace, so the host never has any under $CACHE; check anyway before a
# recursive removal (rm --one-file-system would stop at one, but a bind of / must never be walked).
safe_rm() {
  if findmnt -rn -o TARGET | grep -F "$1" >/dev/null; then die "something is mounted under $1; not removing it"; fi
  rm -rf --one-file-system "$1"
}

if [ ! -s "$PRISTINE" ] || [ -n "${XENBLK_DEBIAN13_REFRESH:-}" ]; then
  t0=$SECONDS
  say "debootstrap $SUITE (minbase + make) from $mirror"
  safe_rm "$CACHE/bootstrap"
  mkdir -p "$CACHE/debootstrap-debs"
  # make is the one thing the quick start assumes (`make demo`); everything else is setup.sh's to install.
  # In a private mount namespace: the /proc debootstrap mounts in the target cannot outlive it on the host.
  unshare --mount --propagation private debootstrap --variant=minbase --include=make \
    --cache-dir="$CACHE/debootstrap-debs" "$SUITE" "$CACHE/bootstrap" "$mirror" >"$CACHE/debootstrap.log" 2>&1 ||
    { tail -20 "$CACHE/debootstrap.log"; die "debootstrap failed (log: $CACHE/debootstrap.log)"; }
  tar -C "$CACHE/bootstrap" --numeric-owner -cf "$PRISTINE.tmp" .
  mv "$PRISTINE.tmp" "$PRISTINE"
  safe_rm "$CACHE/bootstrap"
  say "pristine root cached in $PRISTINE ($((SECONDS - t0)) s)"
fi

t0=$SECONDS
if [ -n "${XENBLK_DEBIAN13_REUSE:-}" ] && [ -d "$RUN/root/xenblk" ]; then
  say "REUSING the last run's root (not a proof that setup.sh installs everything)"
else
  safe_rm "$RUN"
  mkdir -p "$RUN"
  tar -C "$RUN" --numeric-owner -xpf "$PRISTINE"
fi
# This machine's network and trust set-up, as a Debian 13 machine of the same site would have it: name
# resolution, the site's CA certificates (also for when setup.sh's packages pull in ca-certificates), pip.conf.
cp -L /etc/resolv.conf "$RUN/etc/resolv.conf"
if [ -d /usr/local/share/ca-certificates ]; then
  mkdir -p "$RUN/usr/local/share/ca-certificates" && cp -a /usr/local/share/ca-certificates/. "$RUN/usr/local/share/ca-certificates/"; fi
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  mkdir -p "$RUN/etc/ssl/certs" && cp -L /etc/ssl/certs/ca-certificates.crt "$RUN/etc/ssl/certs/"
fi
if [ -f /etc/pip.conf ]; then cp /etc/pip.conf "$RUN/etc/pip.conf"; fi
# No daemon starts from a package's postinst in a chroot (prometheus would, and would take port 9090 of the host).
printf '#!/bin/sh\nexit 101\n' >"$RUN/usr/sbin/policy-rc.d" && chmod 755 "$RUN/usr/sbin/policy-rc.d"
# Downloads survive between runs: apt's .deb archive is a directory of the cache, bound in.
mkdir -p "$CACHE/apt-archives/partial"
# A copy of the working tree: what git tracks (as it is now) plus new files not ignored; no .venv, no build/.
mkdir -p "$RUN/root/xenblk"
git -C "$REPO" ls-files -co --exclude-standard -z |
  while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
  tar -C "$REPO" --null -T - -cf - | tar -C "$RUN/root/xenblk" -xpf -
say "fresh root from the cache + a copy of the working tree ($((SECONDS - t0)) s)"

# Only variables a fresh machine's root shell would have, plus the site's proxy/pip settings if any.
envs=(HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 TERM=dumb
  DEBIAN_FRONTEND=noninteractive)
# The RBD tests' Ceph cluster runs here too. Their 9 errors here on 2026-12-03 had two causes, both in
# Debian 13's Ceph 18.2.7 and handled by tests/fixtures/ceph.py: HEALTH_WARN MGR_MODULE_DEPENDENCY for ever
# (mgr modules without their Python dependencies; accepted alone) and a relative default osd_class_dir
# (the daemons now run in /, else the OSD cannot load cls_rbd and every `rbd create` fails EOPNOTSUPP).
for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY PIP_CERT PIP_DEFAULT_TIMEOUT PIP_INDEX_URL \
  PIP_DISABLE_PIP_VERSION_CHECK CI; do
  if [ -n "${!v:-}" ]; then envs+=("$v=${!v}"); fi
done

say "running in the Debian 13 root: $STEPS"
t0=$SECONDS
set +e
# --pid --fork: the chroot's processes are children of a new PID 1 and all die with it; --mount with private
# propagation: the mounts below exist only in this namespace and vanish with it. The trap unmounts in order
# anyway, so a long-lived leftover process could not pin them either.
unshare --mount --propagation private --pid --fork --kill-child -- bash -euo pipefail -c '
  R=$1 CACHE=$2 STEPS=$3; shift 3
  cleanup() { umount -R "$R/proc" "$R/sys" "$R/dev" "$R/var/cache/apt/archives" 2>/dev/null || true; }
  trap cleanup EXIT
  mount -t proc proc "$R/proc"
  mount -t sysfs sysfs "$R/sys"
  mount --bind /dev "$R/dev"
  mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$R/dev/pts"
  mount --bind "$R/dev/pts/ptmx" "$R/dev/ptmx"
  mount -t tmpfs -o mode=1777,nosuid,nodev shm "$R/dev/shm"
  mount --bind "$CACHE/apt-archives" "$R/var/cache/apt/archives"
  chroot "$R" chown -R _apt:root /var/cache/apt/archives/partial
  chroot "$R" /usr/bin/env -i "$@" bash -euo pipefail -c "cd /root/xenblk && $STEPS"
' debian13-ns "$RUN" "$CACHE" "$STEPS" "${envs[@]}" &
ns=$!
# Stopped from outside (make's Ctrl-C, a CI timeout's TERM): take the namespace down with us.
# unshare --fork ignores INT and TERM itself; KILL it, and --kill-child's death signal takes the namespace's PID 1
# and so every process in it.
trap 'kill -KILL "$ns" 2>/dev/null; wait "$ns"; say "stopped"; exit 130' INT TERM HUP
wait "$ns"
rc=$?
trap - INT TERM HUP
set -e
say "in the root: $([ "$rc" = 0 ] && echo passed || echo "FAILED (exit $rc)") in $((SECONDS - t0)) s; total $((SECONDS - t_all)) s"
if [ "$rc" = 0 ] && [ -z "${XENBLK_DEBIAN13_REUSE:-}" ]; then safe_rm "$RUN"; else say "its root is left in $RUN"; fi
exit "$rc"
