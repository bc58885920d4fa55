#!/bin/bash
# Dom0 side of `make xen-restart` (run by tests/xen/run.sh restart inside the xen-vm Dom0).
#  1. `xenblk serve` under a restart loop: the xen-vm Dom0 has no systemd (lib/dom0-stage is
#     PID 1), so a bash loop does what the unit's Restart=on-failure RestartSec=1 does
#  2. a PV guest; `xenblk attach` gives it a raw file (xvdb) and a dm-linear + dm-error device
#     (xvdd: first half on a loop device, second half `error`)
#  3. while the guest's fio write+verify loop runs on xvdb, kill -9 the daemon twice; each time
#     it must come back (list answers), the backends stay Connected (4), `device.resumed` logged
#  4. the guest: every fio pass verified, no I/O error on xvdb, the dm-error half fails its
#     reads; Dom0: xenblk_errors_total{reason="io"} > 0, no stale_connection, SIGTERM exits
# Env: XEN_TEST_OUT (a shared dir for logs), XEN_TEST_INITRD. Exit status: failures (0 = pass).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
source "$ROOT/tests/xen/dom0-lib.sh"
OUT=${XEN_TEST_OUT:?}
INITRD=${XEN_TEST_INITRD:?}
KILLS=${XEN_RESTART_KILLS:-2}
IMG=/dev/shm/xenblk-restart
mkdir -p "$IMG"
CONF=$OUT/xenblk.toml
xb() { "$XENBLK" --config "$CONF" "$@"; }

step "images"
random_image "$IMG/raw.img" 64
truncate -s 32M "$IMG/dm.img"
loop=$(losetup -f --show "$IMG/dm.img") || bad "losetup"
modprobe dm-mod 2> /dev/null
# no udev in the test Dom0: libdevmapper makes the /dev/mapper node itself
DMDISKS=xvdd
printf '0 32768 linear %s 0\n32768 32768 error\n' "$loop" | DM_DISABLE_UDEV=1 dmsetup create --noudevsync xbdmerr &&
    [ -b /dev/mapper/xbdmerr ] && ok "dm-linear + dm-error device /dev/mapper/xbdmerr" ||
    { bad "dmsetup create xbdmerr"; DMDISKS=; }

cat > "$CONF" << TOML
[daemon]
backend_types = ["vbd3"]
run_dir = "/run/xenblk"
state_dir = "/var/lib/xenblk"
[log]
format = "json"
level = "debug"
[metrics]
listen = "127.0.0.1:9469"
[storage]
allowed_dirs = ["$IMG", "/dev"]
TOML

ip link set lo up # the test Dom0 leaves loopback down: the metrics endpoint listens on 127.0.0.1

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
        sleep 1
    done
}
supervise &
SUP_PID=$!
serve_pid() { cat /run/xenblk-serve.pid 2> /dev/null; }
wait_up() { # wait_up OLD_PID: a new serve process answers `xenblk list`
    local t0=$SECONDS t p
    while :; do
        t=$((SECONDS - t0))
        p=$(serve_pid)
        [ -n "$p" ] && [ "$p" != "$1" ] && xb list > /dev/null 2>&1 && { echo "$t"; return 0; }
        [ $t -ge 120 ] && return 1
        sleep 1
    done
}
t=$(wait_up none) && ok "xenblk serve up (pid $(serve_pid)) after ${t}s" || bad "xenblk serve did not come up"

step "guest"
name=xbrestart
guest_start "$name" "$INITRD" 2 "xbmode=restart xbdisks=xvdb${DMDISKS:+,$DMDISKS} xbseconds=${XEN_RESTART_SECONDS:-60}" || bad "xl create"
domid=$(xl domid "$name")
guest_ready "$name" 180
xb attach "$domid" "$IMG/raw.img" --vdev xvdb --format raw --wait --timeout 240 && ok "attach raw.img as xvdb" ||
    bad "attach raw.img as xvdb"
if [ -n "$DMDISKS" ]; then
    xb attach "$domid" /dev/mapper/xbdmerr --vdev xvdd --format block --wait --timeout 240 &&
        ok "attach /dev/mapper/xbdmerr as xvdd" || bad "attach /dev/mapper/xbdmerr as xvdd"
fi
xb list
bstate() { xenstore-read "/local/domain/0/backend/vbd3/$domid/$(devid "$1")/state" 2> /dev/null; }

step "kill -9 the daemon mid-I/O, $KILLS times"
t=0
until grep -qs 'GUEST restart-io-start' "$CONSOLE_DIR/guest-$name.log"; do
    [ $t -ge 300 ] && { bad "the guest workload did not start"; break; }
    sleep 1; t=$((t + 1))
done
for k in $(seq "$KILLS"); do
    sleep 5
    if grep -qs 'GUEST restart-io-done' "$CONSOLE_DIR/guest-$name.log"; then
        bad "kill $k: the guest workload already finished (raise XEN_RESTART_SECONDS)"; break
    fi
    before=$(grep -c '"device.resumed"' "$OUT/serve.log")
    old=$(serve_pid)
    kill -KILL "$old" && echo "$(date -u +%T) kill -9 $old" | tee -a "$OUT/restarts.log"
    if t=$(wait_up "$old"); then
        ok "kill $k: serve back (pid $(serve_pid)) after ${t}s"
    else
        bad "kill $k: serve not back after 120s"; tail -30 "$OUT/serve.log"; break
    fi
    for v in xvdb $DMDISKS; do
        s=$(bstate $v)
        [ "$s" = 4 ] && ok "kill $k: $v backend still Connected (4)" || bad "kill $k: $v backend state $s"
    done
    t=0
    want=$((1 + ${#DMDISKS} / 4)) # one per disk
    while [ $(($(grep -c '"device.resumed"' "$OUT/serve.log") - before)) -lt $want ] && [ $t -lt 60 ]; do sleep 1; t=$((t + 1)); done
    n=$(($(grep -c '"device.resumed"' "$OUT/serve.log") - before))
    [ "$n" -ge $want ] && ok "kill $k: device.resumed for all $want disks" || bad "kill $k: device.resumed $n times, expected $want"
done

if [ -n "$DMDISKS" ]; then # the error counters, while the guest still has its disks
    t=0
    until grep -qs 'GUEST dm-error-checked' "$CONSOLE_DIR/guest-$name.log"; do
        { [ $t -ge 300 ] || ! xl domid "$name" > /dev/null 2>&1; } && break
        sleep 1; t=$((t + 1))
    done
    metrics=$("$ROOT/.venv/bin/python" -c 'import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:9469/metrics", timeout=10).read().decode())' 2>&1)
    printf '%s\n' "$metrics" > "$OUT/metrics.txt"
    io=$(grep '^xenblk_errors_total{.*reason="io"' <<< "$metrics" | awk '{s += $NF} END {print s + 0}')
    [ "${io%.*}" -gt 0 ] && ok "xenblk_errors_total{reason=\"io\"} = $io" || bad "xenblk_errors_total{reason=\"io\"} = $io (metrics.txt)"
fi

step "guest payload"
out=$(xen-vm-guest wait "$name" --timeout "${XEN_TEST_GUEST_TIMEOUT:-480}")
rc=$?
printf '%s\n' "$out" > "$OUT/guest-console.txt"
grep -E '^GUEST' <<< "$out"
[ $rc = 0 ] && ok "guest payload passed" || bad "guest payload exit status $rc (console: guest-console.txt)"

step "after the guest"
grep -q '"device.stale_connection"' "$OUT/serve.log" && bad "serve.log has device.stale_connection" ||
    ok "no device.stale_connection in serve.log"
xb list && ok "the daemon still serves" || bad "xenblk list"
kill -TERM "$(serve_pid)"
wait "$SUP_PID"
tail -1 "$OUT/restarts.log" | grep -q 'status 0$' && ok "xenblk serve exited 0 on SIGTERM" ||
    bad "xenblk serve on SIGTERM: $(tail -1 "$OUT/restarts.log")"
cat "$OUT/restarts.log"
grep -ciE '"level": *"(error|critical)"|Traceback' "$OUT/serve.log" | xargs -I{} echo "serve.log: {} error lines"
dmsetup remove xbdmerr; losetup -d "$loop"
echo "xen-restart: $fails failures"
exit $((fails > 100 ? 100 : fails))
