#!/bin/bash
# Host side of `make xen-test` / `make xen-bench`: boots real Xen 4.17 + a Debian Dom0 under
# QEMU (../shared/xen-vm, software emulation) once and runs the Dom0 script there.
#   tests/xen/run.sh [test|bench|lvm|restart]    (default test)
# Env: XENVM (the xen-vm directory), XEN_TEST_BACKEND=blkback (test: the harness against the
# in-kernel backend), XEN_BENCH_RUNTIME (bench: seconds per fio job), XEN_TEST_TIMEOUT.
# Logs: build/xen-<what>/ (run.log, serial.log, serve.log, guest-console.txt, xenstore-*.txt).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WHAT=${1:-test}
XENVM=${XENVM:-$ROOT/../shared/xen-vm}
OUT=$ROOT/build/xen-$WHAT
case $WHAT in
    test) script=tests/xen/dom0-test.sh ;;
    bench) script=tests/xen/dom0-bench.sh ;;
    lvm) script=tests/xen/lvm-storage.sh ;;
    restart) script=tests/xen/dom0-restart.sh ;;
    *) echo "usage: $0 [test|bench|lvm|restart]" >&2; exit 2 ;;
esac
if [ ! -x "$XENVM/xen-vm" ]; then
    echo "xen-$WHAT: $XENVM/xen-vm not found (set XENVM to the shared xen-vm directory)" >&2
    exit 1
fi
rm -rf "$OUT"
mkdir -p "$OUT"
start=$(date +%s)
"$XENVM/xen-vm" setup > "$OUT/setup.log" 2>&1 || { tail -20 "$OUT/setup.log"; exit 1; }
INITRD=$OUT/guest.cpio.gz
"$XENVM/xen-vm" guest-initrd "$INITRD" "$ROOT/tests/xen/guest-payload.sh" > "$OUT/initrd.log" 2>&1 ||
    { cat "$OUT/initrd.log"; exit 1; }
export XEN_TEST_OUT=$OUT XEN_TEST_INITRD=$INITRD XEN_BENCH_RUNTIME=${XEN_BENCH_RUNTIME:-5}
rc=0
"$XENVM/xen-vm" run --timeout "${XEN_TEST_TIMEOUT:-1800}" --mem 4096 --log "$OUT/serial.log" --share "$OUT" -- \
    "$ROOT/$script" 2>&1 | tee "$OUT/run.log" || rc=$?
if [ "$WHAT" = bench ] && [ -s "$OUT/guest-console.txt" ]; then
    "$ROOT/.venv/bin/python" -m bench.xen_bench "$OUT/guest-console.txt" --runtime "${XEN_BENCH_RUNTIME:-5}" || rc=1
fi
echo "xen-$WHAT: exit status $rc after $(($(date +%s) - start))s; logs in $OUT" | tee -a "$OUT/run.log"
if [ "$rc" = 0 ]; then
    rm -f "$INITRD" "$OUT/serial.log" # the big ones; kept on failure
fi
exit "$rc"
