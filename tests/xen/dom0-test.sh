#!/bin/bash
# Dom0 side of `make xen-test` (run by tests/xen/run.sh inside the test Dom0, either flavour).
#  1. the LVM check of the block-device driver (tests/xen/lvm-storage.sh)
#  2. `xenblk serve` from the checkout on the real platform, as the systemd unit runs it
#  3. a PV guest with no disks; `xenblk attach` gives it a raw file (xvdb), a qcow2 over a
#     raw backing file (xvdc) and a thin LVM LV (xvdd); tests/xen/guest-payload.sh checks
#     them from inside (negotiated features, fio crc32c, discard, unbind/bind)
#  4. after the guest: discards reached the images, qemu-img check is clean, SIGTERM stops the daemon
# XEN_TEST_BACKEND=blkback serves the same disks with the in-kernel blkback instead (all raw),
# to check the harness itself against a known-good backend.
# Every wait is for a condition (a console line, a XenStore state) with a failure bound only.
# Env: XEN_TEST_OUT, XEN_TEST_INITRD (dom0-lib.sh). Exit status: failures (0 = pass).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
source "$ROOT/tests/xen/dom0-lib.sh"
OUT=${XEN_TEST_OUT:?}
INITRD=${XEN_TEST_INITRD:?}
BACKEND=${XEN_TEST_BACKEND:-xenblk}
IMG=/dev/shm/xenblk-test
mkdir -p "$IMG"
SERVE_PID=
platform

step "LVM: the block-device driver on a linear and a thin LV"
if [ -n "${XEN_TEST_SKIP_LVM:-}" ]; then
    skip "XEN_TEST_SKIP_LVM"
elif "$ROOT/tests/xen/lvm-storage.sh" "$IMG/lvm" > "$OUT/lvm.log" 2>&1; then
    ok "LVM storage checks ($(grep -c '^LVM ok' "$OUT/lvm.log") passed; $(grep -m1 '^LVM platform' "$OUT/lvm.log"))"
else
    grep -E '^LVM (FAIL|failures)' "$OUT/lvm.log"; bad "LVM storage checks (log: lvm.log)"
fi

step "images"
random_image "$IMG/raw.img" 64 && random_image "$IMG/base.raw" 64 && ok "raw.img, base.raw (64 MiB random)" || bad "random images"
qemu-img create -q -f qcow2 -b "$IMG/base.raw" -F raw "$IMG/disk.qcow2" && ok "disk.qcow2 over base.raw" || bad "qemu-img create"
lv=$(thin_lv "$IMG" xbtvg thin 64) && ok "thin LV $lv" || bad "thin LV"
if [ "$BACKEND" = blkback ]; then
    random_image "$IMG/second.img" 64 # blkback serves no qcow2
fi

step "guest"
name=xbtest
guest_start "$name" "$INITRD" 2 "xbmode=test xbdisks=xvdb,xvdc,xvdd xbqueues=2" || bad "xl create"
domid=$(xl domid "$name")
guest_ready "$name" "$BOUND"

step "attach ($BACKEND)"
declare -A IMAGE FORMAT PHY
IMAGE=([xvdb]=$IMG/raw.img [xvdc]=$IMG/disk.qcow2 [xvdd]=$lv)
FORMAT=([xvdb]=raw [xvdc]=qcow2 [xvdd]=block)
if [ "$BACKEND" = xenblk ]; then
    betype=vbd3
    write_config "$OUT/xenblk.toml" "$IMG"
    start_daemon "$OUT/xenblk.toml" "$OUT/serve.log"
else
    betype=vbd
    IMAGE[xvdc]=$IMG/second.img
    for v in xvdb xvdc xvdd; do
        PHY[$v]=${IMAGE[$v]}
        [ -b "${PHY[$v]}" ] || PHY[$v]=$(losetup -f --show "${IMAGE[$v]}")
    done
fi
attach_disk() {
    local v=$1
    if [ "$BACKEND" = xenblk ]; then
        "$XENBLK" --config "$OUT/xenblk.toml" attach "$domid" "${IMAGE[$v]}" --vdev "$v" --format "${FORMAT[$v]}" \
            --wait --timeout "$BOUND"
    else
        xen-vm-guest attach-by-hand "$domid" "$v" "/local/domain/0/backend/vbd/$domid/$(devid "$v")" \
            type=phy params="${PHY[$v]}" physical-device="$(stat -L -c %t:%T "${PHY[$v]}")"
    fi
}
detach_disk() {
    local v=$1 id; id=$(devid "$1")
    if [ "$BACKEND" = xenblk ]; then
        "$XENBLK" --config "$OUT/xenblk.toml" detach "$domid" "$v" --timeout "$BOUND"
    else
        xenstore-rm "/local/domain/$domid/device/vbd/$id" && xenstore-rm "/local/domain/0/backend/vbd/$domid/$id"
    fi
}
for v in xvdb xvdc xvdd; do
    attach_disk $v && ok "attach ${IMAGE[$v]} as $v ($BACKEND)" || bad "attach ${IMAGE[$v]} as $v ($BACKEND)"
done
[ "$BACKEND" = xenblk ] && "$XENBLK" --config "$OUT/xenblk.toml" list

# The payload closes its disks (unbind), then asks for them again: the toolstack's part
reattach_on_request() {
    until grep -qs 'GUEST reattach-please' "$CONSOLE_DIR/guest-$name.log"; do
        xl domid "$name" > /dev/null 2>&1 || return 0
        sleep 1
    done
    step "the guest closed its disks: detach and re-attach"
    local v
    for v in xvdb xvdc xvdd; do
        wait_for "$BOUND" eval '[ "$(backend_state $betype $domid $v)" = 6 ]' && ok "$v: backend followed the guest to Closed" ||
            bad "$v: backend state $(backend_state $betype $domid $v) after the guest closed (bound ${BOUND}s)"
        detach_disk $v && ok "$v: detached" || bad "$v: detach"
        if attach_disk $v; then
            ok "$v: re-attached"
        else # what both ends say; the other disks would wait the same bound again
            bad "$v: re-attach"
            xenstore-ls -fp "/local/domain/$domid/device/vbd" 2>&1 | sed 's/^/DOM0   /'
            xenstore-ls -fp "/local/domain/0/backend/$betype/$domid" 2>&1 | sed 's/^/DOM0   /'
            return 1
        fi
    done
}
reattach_on_request > "$OUT/reattach.log" 2>&1 &
reattach_pid=$!
# what the daemon sees, every 60 s, to watch a run from the host (one CLI call: under TCG each
# Python start costs seconds of CPU the guest and the daemon would otherwise have)
if [ "$BACKEND" = xenblk ]; then
    while sleep 60; do
        date -u +%T; "$XENBLK" --config "$OUT/xenblk.toml" stats --json
    done > "$OUT/monitor.log" 2>&1 &
    monitor_pid=$!
fi

# what the guest's blkfront negotiated, as the frontend wrote it (all there once it is Connected)
for v in xvdb xvdc xvdd; do
    wait_for "$BOUND" eval '[ "$(frontend_state $domid $v)" = 4 ]' || bad "$v: frontend state $(frontend_state $domid $v), not Connected (bound ${BOUND}s)"
done
xenstore-ls -fp "/local/domain/0/backend/$betype/$domid" > "$OUT/xenstore-backend.txt" 2>&1
xenstore-ls -fp "/local/domain/$domid/device/vbd" > "$OUT/xenstore-frontend.txt" 2>&1
for v in xvdb xvdc xvdd; do
    fe=/local/domain/$domid/device/vbd/$(devid $v)
    order=$(xenstore-read "$fe/ring-page-order" 2> /dev/null || echo 0)
    nq=$(xenstore-read "$fe/multi-queue-num-queues" 2> /dev/null || echo 1)
    echo "DOM0 $v frontend: ring-page-order=$order multi-queue-num-queues=$nq" \
        "protocol=$(xenstore-read "$fe/protocol" 2> /dev/null) persistent=$(xenstore-read "$fe/feature-persistent" 2> /dev/null)"
    [ "$order" -ge 1 ] && ok "$v: multi-page ring ($((1 << order)) pages)" || bad "$v: single-page ring"
    [ "$nq" = 2 ] && ok "$v: 2 queues" || bad "$v: $nq queues, expected 2"
done

step "guest payload"
guest_finish "$name" $((BOUND * 2))
wait $reattach_pid
[ -n "${monitor_pid:-}" ] && kill "$monitor_pid"
cat "$OUT/reattach.log"
add_fails "$OUT/reattach.log"

step "after the guest"
# the guest wrote 0xab over [32, 40) MiB of every disk, then discarded it
read_is_zero "$IMG/raw.img" 32 8 && ok "raw.img: the discarded range reads zeros" || bad "raw.img: discard did not reach the file"
read_is_zero "$lv" 32 8 && ok "$lv: the discarded range reads zeros" || bad "$lv: discard did not reach the thin LV"
if [ "$BACKEND" = xenblk ]; then
    # The daemon may still hold the image (its OFD lock, README "Image ownership") for a guest that is
    # gone; nothing writes it now. QEMU's own byte locks conflict with that lock even under -U: off,
    # for the image and for its backing file (the daemon's read lock there fails QEMU's "consistent read").
    unlocked='json:{"driver": "qcow2", "file": {"driver": "file", "filename": "'"$IMG/disk.qcow2"'", "locking": "off"},
      "backing": {"driver": "raw", "file": {"driver": "file", "filename": "'"$IMG/base.raw"'", "locking": "off"}}}'
    qemu-img map -U --output=json "$unlocked" > "$OUT/qcow2-map.json"
    "$ROOT/.venv/bin/python" - "$OUT/qcow2-map.json" << 'PY' && ok "disk.qcow2: no data left in the discarded clusters" || bad "disk.qcow2: discarded range still holds data"
import json, sys
lo, hi = 32 << 20, 40 << 20
bad = [e for e in json.load(open(sys.argv[1])) if e["start"] < hi and e["start"] + e["length"] > lo and e["depth"] == 0 and e["data"]]
for e in bad:
    print(f"  still allocated: {e}")
sys.exit(1 if bad else 0)
PY
    qemu-img check -U "$unlocked" > "$OUT/qemu-img-check.txt" 2>&1 && ok "qemu-img check disk.qcow2 clean" ||
        { cat "$OUT/qemu-img-check.txt"; bad "qemu-img check disk.qcow2"; }
    grep -q 'No errors were found\|no errors' "$OUT/qemu-img-check.txt" && ! grep -qi 'leaked' "$OUT/qemu-img-check.txt" ||
        bad "qemu-img check disk.qcow2 reports leaks or errors"
    "$XENBLK" --config "$OUT/xenblk.toml" list
    stop_daemon
    grep -ciE '"level": *"(error|critical)"|Traceback' "$OUT/serve.log" | xargs -I{} echo "serve.log: {} error lines"
    # the toolstack's cleanup of the dead guest's disks (nodes `xenblk attach` wrote, which xl
    # does not know): the restart script that may run next in this Dom0 starts from nothing
    xenstore-rm "/local/domain/0/backend/vbd3/$domid" 2> /dev/null
else
    xenstore-rm "/local/domain/0/backend/vbd/$domid"
    for v in xvdb xvdc; do losetup -d "${PHY[$v]}"; done
fi
summary "xen-test ($BACKEND)"
