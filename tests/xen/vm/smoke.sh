#!/bin/bash
# Self-test of the harness: boot FLAVOUR, serve a raw file with the checkout's `xenblk serve`,
# start a PV guest, `xenblk attach` the file as xvdb, the guest writes 8 MiB of random data,
# drops its caches, reads them back and compares; Dom0 then compares the image with what the
# guest wrote (sha256 printed by the guest on its console).
#   tests/xen/vm/smoke.sh d12|d13        (logs: build/xenvm-smoke-FLAVOUR/)
# In Dom0 (run by xenvm) it is called with --dom0.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../../.." && pwd)

if [ "${1:-}" != --dom0 ]; then
    flavour=${1:?usage: smoke.sh d12|d13}
    out=$REPO/build/xenvm-smoke-$flavour
    rm -rf "$out" && mkdir -p "$out"
    t0=$SECONDS
    "$HERE/xenvm" setup "$flavour" || exit 1
    # the guest payload: this file's guest part
    sed -n '/^# --- guest payload/,$p' "$0" > "$out/payload.sh"
    "$HERE/xenvm" guest-initrd "$flavour" "$out/guest.cpio.gz" "$out/payload.sh" || exit 1
    rc=0
    XEN_TEST_OUT=$out XEN_TEST_INITRD=$out/guest.cpio.gz "$HERE/xenvm" run "$flavour" --timeout "${XEN_TEST_TIMEOUT:-1800}" --log "$out/serial.log" \
        --share "$out" -- "$0" --dom0 2>&1 | tee "$out/run.log" || rc=$?
    echo "smoke $flavour: exit status $rc after $((SECONDS - t0))s (logs in $out)" | tee -a "$out/run.log"
    exit "$rc"
fi

OUT=${XEN_TEST_OUT:?}
XENBLK=$REPO/.venv/bin/xenblk
IMG=/dev/shm/xenvm-smoke
mkdir -p "$IMG" /run/xenblk /var/lib/xenblk
fail() { echo "SMOKE FAIL: $*"; exit 1; }
truncate -s 64M "$IMG/disk.raw"
cat > "$OUT/xenblk.toml" << TOML
[daemon]
backend_types = ["vbd3"]
run_dir = "/run/xenblk"
state_dir = "/var/lib/xenblk"
[storage]
allowed_dirs = ["$IMG"]
TOML
"$XENBLK" --config "$OUT/xenblk.toml" serve > "$OUT/serve.log" 2>&1 &
serve=$!
# ready = the daemon's own marker in its log (bound: 600 s under a loaded TCG host)
t0=$SECONDS
until grep -q daemon.ready "$OUT/serve.log"; do
    kill -0 $serve 2> /dev/null || fail "xenblk serve exited: $(tail -3 "$OUT/serve.log")"
    [ $((SECONDS - t0)) -lt 600 ] || fail "xenblk serve not ready after 600s"
    sleep 1
done
echo "SMOKE ok: xenblk serve ready"
xen-vm-guest start smoke "$XEN_TEST_INITRD" || fail "xl create"
domid=$(xl domid smoke)
"$XENBLK" --config "$OUT/xenblk.toml" attach "$domid" "$IMG/disk.raw" --vdev xvdb --format raw --wait --timeout 600 ||
    fail "xenblk attach"
echo "SMOKE ok: attached $IMG/disk.raw as xvdb of domain $domid"
console=$(xen-vm-guest wait smoke --timeout 1200)
grc=$?
echo "$console" | grep -a '^GUEST' | sed 's/^/  /'
[ $grc = 0 ] || fail "guest payload exit status $grc"
want=$(echo "$console" | sed -n 's/^GUEST sha256 \([0-9a-f]*\).*/\1/p')
got=$(head -c 8M "$IMG/disk.raw" | sha256sum | cut -d' ' -f1)
[ -n "$want" ] && [ "$want" = "$got" ] || fail "image content $got, guest wrote $want"
echo "SMOKE ok: the image holds what the guest wrote (sha256 $got)"
"$XENBLK" --config "$OUT/xenblk.toml" list
kill $serve
wait $serve
echo "SMOKE ok: all"
exit 0

# --- guest payload (busybox sh in the guest; copied out by the host part) ---
for _ in $(seq 600); do [ -b /dev/xvdb ] && break; sleep 1; done
[ -b /dev/xvdb ] || { echo "GUEST FAIL: no xvdb"; exit 1; }
echo "GUEST xvdb $(cat /sys/block/xvdb/size) sectors"
dd if=/dev/urandom of=/tmp/w bs=1M count=8 2> /dev/null
dd if=/tmp/w of=/dev/xvdb bs=1M conv=fsync 2> /dev/null || { echo "GUEST FAIL: write"; exit 1; }
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/xvdb of=/tmp/r bs=1M count=8 2> /dev/null || { echo "GUEST FAIL: read"; exit 1; }
cmp /tmp/w /tmp/r || { echo "GUEST FAIL: read back differs"; exit 1; }
echo "GUEST sha256 $(sha256sum < /tmp/w | cut -d' ' -f1)"
echo "GUEST ok: 8 MiB written, read back equal"
