#!/bin/bash
# `make xen-test`: boot real Xen 4.17 + Dom0 under QEMU (../shared/xen-vm), serve a PV
# guest's disks with xenblk, run fio inside the guest. Logs stay in build/xen-test/.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
XENVM=${XENVM:-$ROOT/../shared/xen-vm}
OUT=$ROOT/build/xen-test
rm -rf "$OUT"; mkdir -p "$OUT"
if [ ! -x "$XENVM/xen-vm" ]; then
    echo "xen-test: $XENVM/xen-vm not found (the shared xen-vm tool must sit beside the checkout)" >&2
    exit 1
fi
"$XENVM/xen-vm" setup > "$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
INITRD=$OUT/guest.cpio.gz
"$XENVM/xen-vm" guest-initrd "$INITRD" "$ROOT/tests/xen/guest-payload.sh" > "$OUT/initrd.log" 2>&1
export XEN_TEST_OUT=$OUT XEN_TEST_INITRD=$INITRD
rc=0
"$XENVM/xen-vm" run --timeout 1500 --mem 3072 --log "$OUT/serial.log" --share "$OUT" -- \
    "$ROOT/tests/xen/dom0-test.sh" 2>&1 | tee "$OUT/run.log" || rc=$?
[ "$rc" = 0 ] || echo "xen-test: FAILED (rc=$rc); logs in $OUT" >&2
exit $rc
