#!/bin/bash
# Dom0 side of `make xen-restart` (run by tests/xen/run.sh inside the test Dom0, either flavour).
#  1. `xenblk serve` under a restart loop that does what the unit's Restart=on-failure
#     RestartSec=1 does (the same loop on both flavours, so the kills below are ours to count)
#  2. a PV guest; `xenblk attach` gives it a fresh qcow2 (xvdb; every pass allocates, so the kills
#     hit allocating writes; XEN_RESTART_FORMAT=raw: a raw file) and a dm-linear + dm-error device
#     (xvdd: first half on a loop device, second half `error`)
#  3. the guest runs crc32c write+verify passes on xvdb until told to stop, announcing each pass.
#     Kill k (kill -9 of the daemon) is triggered by a pass that started after the previous
#     restart with its I/O seen flowing through the daemon (its request counter grew); after
#     each kill: the daemon is back (list answers), the backends stayed Connected (4),
#     `device.resumed` logged once per disk, and the pass that was running verified. After the
#     last kill a pass that started after the restart must verify too; then Dom0 says stop.
#  4. the guest: no I/O error on xvdb, every verified pass verifies again at the end, the dm-error
#     half fails its reads; Dom0: `qemu-img check` of the qcow2 finds no corruption (leaked
#     clusters of an allocation the kill cut short are reported, not failed),
#     xenblk_errors_total{reason="io"} > 0, no stale_connection, SIGTERM exits 0
# Nothing waits for a time to pass: every wait is for a marker, with a generous failure bound,
# so a fast guest just runs more passes and a slow one fewer.
# Env: XEN_TEST_OUT, XEN_TEST_INITRD (dom0-lib.sh), XEN_RESTART_KILLS (default 2),
# XEN_RESTART_PASS_MIB (MiB per guest pass, default 16, at most 16; 1 = short passes),
# XEN_RESTART_HOGS (busy loops in Dom0 during the kills, default 0), XEN_TEST_BOUND (dom0-lib.sh).
# Exit status: failures (0 = pass).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
source "$ROOT/tests/xen/dom0-lib.sh"
OUT=${XEN_TEST_OUT:?}
INITRD=${XEN_TEST_INITRD:?}
KILLS=${XEN_RESTART_KILLS:-2}
HOGS=${XEN_RESTART_HOGS:-0}    # busy loops in Dom0 during the kills: a slower machine, same checks
IMG=/dev/shm/xenblk-restart
mkdir -p "$IMG"
CONF=$OUT/xenblk.toml
xb() { "$XENBLK" --config "$CONF" "$@"; }
platform

step "images"
# xvdb: a fresh qcow2 (1 GiB, nothing allocated) and passes over 64 regions, so every pass
# allocates clusters and each kill lands in the middle of allocating writes (issue 14 item 7);
# XEN_RESTART_FORMAT=raw runs the same over a raw file
XVDB_FORMAT=${XEN_RESTART_FORMAT:-qcow2}
if [ "$XVDB_FORMAT" = qcow2 ]; then
    qemu-img create -q -f qcow2 "$IMG/xvdb.qcow2" 1G && ok "xvdb.qcow2 (1 GiB, empty)" || bad "qemu-img create"
    XVDB_IMAGE=$IMG/xvdb.qcow2 REGIONS=64
else
    random_image "$IMG/raw.img" 64 && ok "raw.img (64 MiB random)" || bad "raw.img"
    XVDB_IMAGE=$IMG/raw.img REGIONS=4
fi
truncate -s 32M "$IMG/dm.img"
loop=$(losetup -f --show "$IMG/dm.img") || bad "losetup"
modprobe dm-mod 2> /dev/null
DISKS=(xvdb)
# libdevmapper makes the /dev/mapper node itself (DM_DISABLE_UDEV, see dom0-lib.sh), with or without udev
if printf '0 32768 linear %s 0\n32768 32768 error\n' "$loop" | dmsetup create --noudevsync xbdmerr &&
    wait_for "$BOUND" test -b /dev/mapper/xbdmerr; then
    ok "dm-linear + dm-error device /dev/mapper/xbdmerr"
    DISKS+=(xvdd)
else
    bad "dmsetup create xbdmerr"
fi
write_config "$CONF" "$IMG"

step "xenblk serve under a restart loop (Restart=on-failure, RestartSec=1)"
supervise() {
    local rc
    while :; do
        "$XENBLK" --config "$CONF" serve >> "$OUT/serve.log" 2>&1 &
        echo $! > /run/xenblk-serve.pid
        wait $!
        rc=$?
        echo "$(date -u +%T) serve exited with status $rc" >> "$OUT/restarts.log"
        [ "$rc" = 0 ] && break # Restart=on-failure: a clean exit stays down
        sleep 1                # RestartSec=1 (what the unit does, not a wait for anything)
    done
}
supervise &
SUP_PID=$!
serve_pid() { cat /run/xenblk-serve.pid 2> /dev/null; }
serving() { # serving OLD_PID: a serve process other than OLD_PID answers `xenblk list`
    local p; p=$(serve_pid)
    [ -n "$p" ] && [ "$p" != "$1" ] && xb list > /dev/null 2>&1
}
t0=$SECONDS
wait_for "$BOUND" serving none && ok "xenblk serve up (pid $(serve_pid)) after $((SECONDS - t0))s" ||
    bad "xenblk serve did not come up (bound ${BOUND}s)"

step "guest"
name=xbrestart
vdevs=$(IFS=,; echo "${DISKS[*]}")
guest_start "$name" "$INITRD" 2 "xbmode=restart xbdisks=$vdevs xbpassmib=${XEN_RESTART_PASS_MIB:-16} xbregions=$REGIONS" || bad "xl create"
domid=$(xl domid "$name")
guest_ready "$name" "$BOUND"
declare -A IMAGE=([xvdb]=$XVDB_IMAGE [xvdd]=/dev/mapper/xbdmerr) FORMAT=([xvdb]=$XVDB_FORMAT [xvdd]=block)
for v in "${DISKS[@]}"; do
    xb attach "$domid" "${IMAGE[$v]}" --vdev "$v" --format "${FORMAT[$v]}" --wait --timeout "$BOUND" &&
        ok "attach ${IMAGE[$v]} as $v" || bad "attach ${IMAGE[$v]} as $v"
done
xb list

step "kill -9 the daemon mid-I/O, $KILLS times, each on a guest progress marker"
hog_pids=()
for _ in $(seq "$HOGS"); do
    (while :; do :; done) &
    hog_pids+=($!)
done
[ "$HOGS" -gt 0 ] && echo "($HOGS busy loops in Dom0 until the guest stops its passes)"
resumed() { grep -c '"device.resumed"' "$OUT/serve.log"; }
started() { tr -d '\r' < "$CONSOLE_DIR/guest-$name.log" | sed -n 's/^GUEST restart-pass \([0-9]*\) started.*/\1/p' | tail -1; }
END='^GUEST (FAIL|restart-io-done)' # the workload stopped: no marker will come any more
# progress_after N: a pass numbered above N has started (passes above N start after the resume)
progress_after() { [ "$(started)" -gt "$1" ] 2> /dev/null; }
after=0
for k in $(seq "$KILLS"); do
    # 1. a pass that started after the previous restart...
    t0=$SECONDS
    until progress_after $after; do
        if guest_said "$name" "$END" || ! xl domid "$name" > /dev/null 2>&1 || [ $((SECONDS - t0)) -ge "$BOUND" ]; then
            bad "kill $k: no guest pass started after pass $after (bound ${BOUND}s)"; break 2
        fi
        sleep 1
    done
    # 2. ...with its I/O flowing through the running daemon (the request counter grows)
    base=$(disk_requests "$domid" xvdb)
    if wait_for "$BOUND" eval '[ "$(disk_requests "$domid" xvdb)" -gt "$base" ]'; then
        ok "kill $k: pass $(started) running, xvdb requests growing past $base"
    else
        bad "kill $k: no xvdb request served after pass $(started) started (bound ${BOUND}s)"; break
    fi
    before=$(resumed)
    old=$(serve_pid)
    kill -KILL "$old"
    # the pass the kill hit: the last one started (the guest runs them back to back, and one
    # started after the kill blocks on its first request until the daemon is back)
    p=$(started)
    if guest_said "$name" "^GUEST restart-pass $p verified"; then
        where="between pass $p and the next" # only shell lines between two passes: rare
    else
        where="during pass $p"
    fi
    echo "$(date -u +%T) kill -9 $old $where" | tee -a "$OUT/restarts.log"
    t0=$SECONDS
    if wait_for "$BOUND" serving "$old"; then
        ok "kill $k: serve back (pid $(serve_pid)) after $((SECONDS - t0))s"
    else
        bad "kill $k: serve not back (bound ${BOUND}s)"; tail -30 "$OUT/serve.log"; break
    fi
    for v in "${DISKS[@]}"; do
        s=$(backend_state vbd3 "$domid" "$v")
        [ "$s" = 4 ] && ok "kill $k: $v backend still Connected (4)" || bad "kill $k: $v backend state $s"
    done
    if wait_for "$BOUND" eval '[ $(($(resumed) - before)) -ge ${#DISKS[@]} ]'; then
        ok "kill $k: device.resumed for all ${#DISKS[@]} disks"
    else
        bad "kill $k: device.resumed $(($(resumed) - before)) times, expected ${#DISKS[@]} (bound ${BOUND}s)"
    fi
    after=$(started) # the daemon serves again: passes numbered above this start after the resume
    # 3. the pass in flight across the kill verifies
    guest_wait "$name" "^GUEST restart-pass $p verified" "$BOUND" "$END" &&
        ok "kill $k (landed $where): pass $p verified" ||
        { bad "kill $k: pass $p did not verify (see guest-console.txt)"; break; }
done
last=$((after + 1))
if [ "$fails" = 0 ]; then
    guest_wait "$name" "^GUEST restart-pass $last verified" "$BOUND" "$END" &&
        ok "pass $last, started after the last restart, verified" || bad "pass $last did not verify"
fi
guest_tell_until "$name" stop '^GUEST restart-io-done' "$BOUND" &&
    ok "the guest stopped its passes when told: $(tr -d '\r' < "$CONSOLE_DIR/guest-$name.log" | grep -o 'restart-io-done.*')" ||
    bad "the guest did not stop its passes when told (bound ${BOUND}s)"

[ ${#hog_pids[@]} -gt 0 ] && kill "${hog_pids[@]}"

step "dm-error disk: error counter"
if [ "${#DISKS[@]}" -lt 2 ]; then
    skip "no dm-error device"
elif guest_wait "$name" '^GUEST dm-error-checked' "$BOUND"; then # the guest still has its disks
    metrics > "$OUT/metrics.txt"
    io=$(awk '/^xenblk_errors_total\{.*reason="io"/ {s += $NF} END {printf "%d\n", s}' "$OUT/metrics.txt")
    [ "$io" -gt 0 ] && ok "xenblk_errors_total{reason=\"io\"} = $io" || bad "xenblk_errors_total{reason=\"io\"} = $io (metrics.txt)"
else
    bad "the guest did not report its dm-error check (bound ${BOUND}s)"
fi
# the payload holds its disks until told (a no-op for a guest that already powered off)
guest_tell_until "$name" release 'payload exit status' "$BOUND" > /dev/null

step "guest payload"
guest_finish "$name" $((BOUND * 2))

step "after the guest"
grep -q '"device.stale_connection"' "$OUT/serve.log" && bad "serve.log has device.stale_connection" ||
    ok "no device.stale_connection in serve.log"
xb list && ok "the daemon still serves" || bad "xenblk list"
kill -TERM "$(serve_pid)"
wait_for "$BOUND" eval '! kill -0 $SUP_PID 2> /dev/null' || { bad "serve still running ${BOUND}s after SIGTERM"; kill -KILL "$(serve_pid)"; }
wait "$SUP_PID"
tail -1 "$OUT/restarts.log" | grep -q 'status 0$' && ok "xenblk serve exited 0 on SIGTERM" ||
    bad "xenblk serve on SIGTERM: $(tail -1 "$OUT/restarts.log")"
cat "$OUT/restarts.log"
grep -ciE '"level": *"(error|critical)"|Traceback' "$OUT/serve.log" | xargs -I{} echo "serve.log: {} error lines"
if [ "$XVDB_FORMAT" = qcow2 ]; then # the image the kills hit mid-allocation, checked by QEMU's tool
    # exit 0: clean; 3: leaked clusters only. A kill between an allocation's refcount update and
    # its L2 entry (refcount first: the safe order, as QEMU's) leaks that cluster, never corrupts;
    # seen once in four runs. Anything else (2: corruption) fails.
    qemu-img check "$XVDB_IMAGE" > "$OUT/qemu-img-check.txt" 2>&1
    rc=$?
    alloc=$(grep -o '[0-9/]* = [0-9.]*% allocated' "$OUT/qemu-img-check.txt")
    if [ "$rc" = 0 ]; then
        ok "qemu-img check xvdb.qcow2: clean after the kills ($alloc)"
    elif [ "$rc" = 3 ] && ! grep -qi 'corrupt\|ERROR' "$OUT/qemu-img-check.txt"; then
        ok "qemu-img check xvdb.qcow2: no corruption after the kills, $(grep -o '[0-9]* leaked clusters' "$OUT/qemu-img-check.txt") ($alloc)"
    else
        cat "$OUT/qemu-img-check.txt"; bad "qemu-img check xvdb.qcow2 after the kills (exit status $rc)"
    fi
fi
dmsetup remove --retry xbdmerr; losetup -d "$loop"
summary xen-restart
