#!/bin/bash
# Host side of `make xen-test` / `xen-restart` / `xen-bench`: boots real Xen + a Debian Dom0
# under QEMU (software emulation) with the in-repo harness tests/xen/vm/xenvm and runs one
# Dom0 script there.
#   tests/xen/run.sh [d12|d13] [test|bench|lvm|restart|all]  (defaults: $XEN_FLAVOUR or d12; test)
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
    all) script=tests/xen/dom0-all.sh ;;
    *) echo "usage: $0 [d12|d13] [test|bench|lvm|restart|all]" >&2; exit 2 ;;
esac
rm -rf "$OUT"
mkdir -p "$OUT"
start=$(date +%s)
echo "xen-$FLAVOUR-$WHAT: $script on flavour $FLAVOUR; logs in $OUT"
"$XENVM" setup "$FLAVOUR" > "$OUT/setup.log" 2>&1 || { tail -20 "$OUT/setup.log"; exit 1; }
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
