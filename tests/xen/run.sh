#!/bin/bash
# Host side of `make xen-test` / `xen-restart` / `xen-bench`: boots real Xen + a Debian Dom0
# under QEMU (software emulation) with the in-repo harness tests/xen/vm/xenvm and runs one
# Dom0 script there.
#   tests/xen/run.sh [d12|d13] [test|bench|lvm|restart|xl|all]  (defaults: $XEN_FLAVOUR or d12; test)
#     xl: a guest's life through stock xl and the block-xenblk hotplug script (dom0-xl.sh; d13: the
#         trixie package, built here first by packaging/deb-for.sh unless build/trixie/ has it for
#         this tree, installed by apt and run by systemd)
#     all: test then restart in one boot (dom0-all.sh), what `make test` runs
#     d12: Debian 12, Xen 4.17, C xenstored (the harness's PID 1)
#     d13: Debian 13, Xen 4.20, oxenstored started by Debian's xen.service under systemd
# Env: XEN_TEST_BACKEND=blkback (test: the harness against the in-kernel backend),
# XEN_BENCH_RUNTIME (bench: seconds per fio job), XEN_TEST_TIMEOUT (whole boot, failure bound),
# XENBLK_VM_CACHE (the harness's cache, default /var/cache/xenblk-vm). Every XEN_* / XENBLK_*
# variable reaches the Dom0 script.
# Logs: build/xen-<flavour>-<what>/ (run.log, serial.log, serve.log, guest-console.txt, ...).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
XENVM=$ROOT/tests/xen/vm/xenvm
FLAVOUR=${XEN_FLAVOUR:-d12}
case ${1:-} in d12 | d13) FLAVOUR=$1; shift ;; esac
WHAT=${1:-test}
OUT=$ROOT/build/xen-$FLAVOUR-$WHAT
case $WHAT in
    test) script=tests/xen/dom0-test.sh ;;
    bench) script=tests/xen/dom0-bench.sh ;;
    lvm) script=tests/xen/lvm-storage.sh ;;
    restart) script=tests/xen/dom0-restart.sh ;;
    xl) script=tests/xen/dom0-xl.sh ;;
    all) script=tests/xen/dom0-all.sh ;;
    *) echo "usage: $0 [d12|d13] [test|bench|lvm|restart|xl|all]" >&2; exit 2 ;;
esac
rm -rf "$OUT"
mkdir -p "$OUT"
start=$(date +%s)
echo "xen-$FLAVOUR-$WHAT: $script on flavour $FLAVOUR; logs in $OUT"
"$XENVM" setup "$FLAVOUR" > "$OUT/setup.log" 2>&1 || { tail -20 "$OUT/setup.log"; exit 1; }
if [ "$FLAVOUR" = d13 ] && [ "$WHAT" = xl ]; then
    # the package dom0-xl.sh installs, for trixie's python3; rebuilt only when what goes into it
    # changed (the names and contents of those files, committed or not)
    key=$(cd "$ROOT" && git ls-files -co --exclude-standard -z -- xenblk native packaging systemd contrib \
        pyproject.toml README.md docs | sort -z | xargs -0 sha256sum | sha256sum)
    if [ "$(cat "$ROOT/build/trixie/.tree" 2> /dev/null)" != "$key" ] || ! ls "$ROOT"/build/trixie/xenblk_*.deb > /dev/null 2>&1; then
        rm -f "$ROOT"/build/trixie/xenblk_*.deb
        "$ROOT/packaging/deb-for.sh" trixie > "$OUT/deb.log" 2>&1 || { tail -20 "$OUT/deb.log"; exit 1; }
        echo "$key" > "$ROOT/build/trixie/.tree"
    fi
    echo "xen-$FLAVOUR-$WHAT: package $(ls "$ROOT"/build/trixie/xenblk_*.deb) ($(($(date +%s) - start))s)"
fi
INITRD=$OUT/guest.cpio.gz
"$XENVM" guest-initrd "$FLAVOUR" "$INITRD" "$ROOT/tests/xen/guest-payload.sh" > "$OUT/initrd.log" 2>&1 ||
    { cat "$OUT/initrd.log"; exit 1; }
export XEN_TEST_OUT=$OUT XEN_TEST_INITRD=$INITRD XEN_BENCH_RUNTIME=${XEN_BENCH_RUNTIME:-5}
echo "xen-$FLAVOUR-$WHAT: setup + guest initramfs took $(($(date +%s) - start))s"
rc=0
# the whole boot's failure bound: generous, a slow machine only takes longer
timeout=${XEN_TEST_TIMEOUT:-$([ "$WHAT" = all ] && echo 5400 || echo 3600)}
"$XENVM" run "$FLAVOUR" --timeout "$timeout" --mem 4096 --log "$OUT/serial.log" --share "$OUT" -- \
    "$ROOT/$script" 2>&1 | tee "$OUT/run.log" || rc=$?
if [ "$WHAT" = bench ] && [ -s "$OUT/guest-console.txt" ]; then
    "$ROOT/.venv/bin/python" -m bench.xen_bench "$OUT/guest-console.txt" --runtime "${XEN_BENCH_RUNTIME:-5}" || rc=1
fi
echo "xen-$FLAVOUR-$WHAT: exit status $rc after $(($(date +%s) - start))s; logs in $OUT" | tee -a "$OUT/run.log"
if [ "$rc" = 0 ]; then
    rm -f "$INITRD" "$OUT/serial.log" # the big ones; kept on failure
fi
exit "$rc"
