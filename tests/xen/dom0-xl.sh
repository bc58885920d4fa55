#!/bin/bash
# Dom0 side of `run.sh FLAVOUR xl` (and the last script of dom0-all.sh): a guest's life driven by
# stock `xl` alone, with the disk handed to xenblk by the hotplug script (script=block-xenblk);
# no `xenblk attach` anywhere.
#   d13 (Debian 13, Xen 4.20, systemd): `apt install ./xenblk_*.deb` (built for trixie on the
#       host: packaging/deb-for.sh trixie; its dependencies are in the cached root, d13.packages),
#       `systemctl enable --now xenblk`; disks `backendtype=tap` (backend type vbd3)
#   d12 (Debian 12, Xen 4.17, no systemd, tap never works there): the daemon from the checkout run
#       directly under a restart loop (Restart=on-failure stand-in), xen-blkback unloaded, disks
#       `backendtype=phy` (backend type vbd) with daemon.backend_types = ["vbd"]
# Steps: xl create (xvdb, the guest runs crc32c write+verify passes on it throughout) | xl
# block-attach + verified I/O + xl block-detach of xvdc | two refused disks (missing image, outside
# storage.allowed_dirs): xl block-attach fails within a bound with the daemon's reason, nothing left
# in XenStore or the daemon | kill -9 of the daemon mid-I/O (d13: systemctl kill -s KILL) | SIGTERM
# restart mid-I/O (d13: systemctl restart; the devices handed over, the guest unaware) | xl save
# -c | xl save + xl restore | xl reboot | xl shutdown | daemon restart with no guest (d13: systemctl
# restart) | a second guest, xl destroy. After each end of a domain: the backend dirs are gone and
# the daemon holds no image (xenblk list, /proc/PID/fd). Every wait is for a marker (a console
# line, a XenStore node, a pid) with a generous failure bound.
# Env: XEN_TEST_OUT, XEN_TEST_INITRD (dom0-lib.sh), XEN_XL_DEB (d13: the package; default
# build/trixie/xenblk_*.deb of the checkout). Exit status: failures (0 = pass).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
source "$ROOT/tests/xen/dom0-lib.sh"
OUT=${XEN_TEST_OUT:?}
INITRD=${XEN_TEST_INITRD:?}
T_START=$SECONDS
platform
IMGDIR=/var/lib/xen/images # in the unit's ReadWritePaths
mkdir -p "$IMGDIR"
NAME=xbxl
LOG=$CONSOLE_DIR/guest-$NAME.log
if [ "$(cat /proc/1/comm)" = systemd ]; then
    MODE=systemd BTYPE=vbd3 BACKENDTYPE=tap XENBLK=/usr/bin/xenblk
else
    MODE=direct BTYPE=vbd BACKENDTYPE=phy XENBLK=$ROOT/.venv/bin/xenblk
fi
CONF=/etc/xenblk/xenblk.toml # where the package's unit and the hotplug script look
xb() { "$XENBLK" "$@"; }
disk() { # disk VDEV TARGET: the xl disk spec
    local f=""
    [ "$BACKENDTYPE" = tap ] && f="format=raw,"
    echo "${f}vdev=$1,access=rw,backendtype=$BACKENDTYPE,script=block-xenblk,target=$2"
}
echo "DOM0 xl: daemon $MODE, backend type $BTYPE, disk line '$(disk xvdb "$IMGDIR/xl-xvdb.raw")'"

# --- the daemon: its pid, a kill, a restart (systemd or the loop below) --------------------
daemon_pid() {
    if [ $MODE = systemd ]; then
        local p; p=$(systemctl show -P MainPID xenblk)
        [ "$p" != 0 ] && echo "$p"
    else
        cat /run/xenblk-serve.pid 2> /dev/null
    fi
}
# serving OLD_PID: a daemon other than OLD_PID is ready: its XenStore watches are live (the control
# socket, which `xenblk list` asks, answers before that). systemd: active = READY=1 came (Type=notify);
# d12: its log has more daemon.ready lines than when OLD_PID was started
READY_SEEN=0
ready_lines() { grep -c '"\?daemon.ready' "$OUT/serve.log" 2> /dev/null; }
serving() {
    local p; p=$(daemon_pid)
    [ -n "$p" ] && [ "$p" != "$1" ] || return 1
    if [ $MODE = systemd ]; then
        [ "$(systemctl is-active xenblk)" = active ] || return 1
    else
        [ "$(ready_lines)" -gt "$READY_SEEN" ] || return 1
    fi
    READY_SEEN=$(ready_lines)
    xb list > /dev/null 2>&1
}
supervise() { # d12: what the unit's Restart=on-failure does
    local rc
    while :; do
        "$XENBLK" serve >> "$OUT/serve.log" 2>&1 &
        echo $! > /run/xenblk-serve.pid
        wait $!
        rc=$?
        echo "$(date -u +%T) serve exited with status $rc" >> "$OUT/restarts.log"
        [ "$rc" = 0 ] && break
        sleep 1
    done
}
# holds_image PATH: the daemon has PATH open (its fds)
holds_image() { ls -l "/proc/$(daemon_pid)/fd" 2> /dev/null | grep -qF -- "$1"; }
# nothing_left DOMID WHAT: no backend dir of DOMID, no device in the daemon, no image fd
nothing_left() {
    local domid=$1 what=$2 n
    if wait_for "$BOUND" eval '! xenstore-exists /local/domain/0/backend/$BTYPE/$domid'; then
        ok "$what: backend/$BTYPE/$domid removed"
    else
        bad "$what: backend/$BTYPE/$domid still there: $(xenstore-ls -f "/local/domain/0/backend/$BTYPE/$domid" | head -5 | tr '\n' ' ')"
    fi
    n=$(xb list 2> /dev/null | grep -c "^ *$domid[[:space:]]")
    [ "$n" = 0 ] && ok "$what: xenblk list shows no device of domain $domid" || { bad "$what: xenblk list still shows $n devices of domain $domid"; xb list; }
    for img in "$IMGDIR/xl-xvdb.raw" "$IMGDIR/xl-xvdc.raw"; do
        holds_image "$img" && bad "$what: the daemon still holds $img open" || ok "$what: no fd of $img in the daemon"
    done
}

# --- the guest's console: markers after a point (the log of a name spans its reboots/restores) -
mark() { wc -l 2> /dev/null < "$LOG" || echo 0; }
said_since() { tail -n +$(($1 + 1)) "$LOG" 2> /dev/null | tr -d '\r' | grep -qE "$2"; }
# wait_since MARK ERE BOUND [reboot]: a line matching ERE after MARK (1: bound; 2: a guest failure,
# or no guest: except with "reboot", where libxl destroys and creates the domain meanwhile)
wait_since() {
    local m=$1 want=$2 limit=$3 t0=$SECONDS
    until said_since "$m" "$want"; do
        if said_since "$m" '^GUEST FAIL' || { [ "${4:-}" != reboot ] && ! xl domid $NAME > /dev/null 2>&1; }; then
            said_since "$m" "$want" && return 0
            return 2
        fi
        [ $((SECONDS - t0)) -ge "$limit" ] && return 1
        sleep 1
    done
}
last_started() { tail -n +$(($1 + 1)) "$LOG" 2> /dev/null | tr -d '\r' | sed -n 's/^GUEST restart-pass \([0-9]*\) started.*/\1/p' | tail -1; }
# passes_go WHAT: after MARK, a pass starts and a later one verifies (the disk works after WHAT)
passes_go() {
    local m=$1 what=$2 p
    if ! wait_since "$m" '^GUEST restart-pass [0-9]+ started' "$BOUND"; then
        bad "$what: no guest pass started (bound ${BOUND}s)"; return 1
    fi
    p=$(last_started "$m")
    if wait_since "$m" "^GUEST restart-pass $((p + 1)) verified" "$BOUND"; then
        ok "$what: guest passes $p and $((p + 1)) on xvdb verified (crc32c)"
    else
        bad "$what: guest pass $((p + 1)) did not verify (bound ${BOUND}s)"; return 1
    fi
}
domid_now() { xl domid $NAME 2> /dev/null; }

step "install"
if [ $MODE = systemd ]; then
    deb=${XEN_XL_DEB:-$(ls "$ROOT"/build/trixie/xenblk_*_amd64.deb 2> /dev/null | tail -1)}
    if [ -z "$deb" ] || [ ! -r "$deb" ]; then
        bad "no package (build it on the host: packaging/deb-for.sh trixie)"
    elif (cd "$(dirname "$deb")" && DEBIAN_FRONTEND=noninteractive apt-get install -y \
        "./$(basename "$deb")") > "$OUT/apt.log" 2>&1; then
        ok "apt install ./$(basename "$deb") (offline: its dependencies are in the root)"
    else
        tail -20 "$OUT/apt.log"; bad "apt install ./$(basename "$deb")"
    fi
    dpkg -s xenblk 2> /dev/null | grep -E '^(Version|Depends):'
else
    # the checkout's hotplug script as the package installs it, pointed at the checkout's client
    # (libxl passes xl's environment on to the scripts it runs)
    install -m 0755 "$ROOT/contrib/xen/block-xenblk" /etc/xen/scripts/block-xenblk && ok "block-xenblk installed"
    export XENBLK_HOTPLUG_CLIENT=$ROOT/xenblk/hotplug_client.py
    if [ -e /sys/module/xen_blkback ]; then
        if [ -e /sys/module/xen_blkback/initstate ] || modinfo -n xen-blkback 2> /dev/null | grep -q '\.ko'; then
            modprobe -r xen-blkback && ok "xen-blkback unloaded (backend type vbd is xenblk's now)" ||
                bad "modprobe -r xen-blkback"
        else
            bad "xen-blkback is built into this kernel: backend type vbd cannot be xenblk's"
        fi
    else
        ok "xen-blkback not loaded"
    fi
fi
[ -x /etc/xen/scripts/block-xenblk ] && ok "/etc/xen/scripts/block-xenblk present" || bad "no /etc/xen/scripts/block-xenblk"
mkdir -p /etc/xenblk
cat > "$CONF" << TOML
[daemon]
backend_types = ["$BTYPE"]
[log]
level = "debug"
[metrics]
listen = "127.0.0.1:$METRICS_PORT"
[storage]
allowed_dirs = ["$IMGDIR"]
TOML
random_image "$IMGDIR/xl-xvdb.raw" 64 && random_image "$IMGDIR/xl-xvdc.raw" 32 && ok "images xl-xvdb.raw (64 MiB), xl-xvdc.raw (32 MiB)"
random_image /dev/shm/xl-outside.raw 8 # exists, but outside storage.allowed_dirs

step "start the daemon"
t0=$SECONDS
if [ $MODE = systemd ]; then
    # Type=notify: enable --now returns once READY=1 came (the watches are live)
    if systemctl enable --now xenblk > "$OUT/systemctl.log" 2>&1; then
        ok "systemctl enable --now xenblk ($((SECONDS - t0))s)"
    else
        cat "$OUT/systemctl.log"; bad "systemctl enable --now xenblk"
        journalctl -u xenblk --no-pager | tail -30
    fi
    systemctl is-enabled xenblk | grep -qx enabled && ok "xenblk.service enabled" || bad "xenblk.service not enabled"
    systemctl is-active xenblk | grep -qx active && ok "xenblk.service active" || bad "xenblk.service not active"
    echo "DOM0 xenblk.service: MainPID $(daemon_pid): $(tr '\0' ' ' < "/proc/$(daemon_pid)/cmdline" 2> /dev/null)"
else
    supervise &
    SUP_PID=$!
fi
wait_for "$BOUND" serving none && ok "the daemon answers xenblk list (pid $(daemon_pid), $((SECONDS - t0))s)" ||
    bad "the daemon does not answer (bound ${BOUND}s)"

step "xl create"
CFG=/run/xenblk-xl-$NAME.cfg
guest_cfg() { # guest_cfg NAME MODE_ARGS
    cat << CFG
name = "$1"
type = "pv"
kernel = "$GUEST_KERNEL"
ramdisk = "$INITRD"
extra = "console=hvc0 quiet xbmode=xl xbdisks=xvdb xbreload=0 xbpassmib=4 $2"
memory = 512
vcpus = 1
on_poweroff = "destroy"
on_reboot = "restart"
on_crash = "destroy"
disk = [ '$(disk xvdb "$IMGDIR/xl-xvdb.raw")' ]
CFG
}
guest_cfg $NAME "" > "$CFG"
rm -f "$LOG"
t0=$SECONDS
if timeout "$BOUND" xl create -q "$CFG" > "$OUT/xl-create.log" 2>&1; then
    ok "xl create $NAME (domid $(domid_now), $((SECONDS - t0))s)"
else
    cat "$OUT/xl-create.log"; bad "xl create (bound ${BOUND}s)"
    xenstore-ls -f /local/domain/0/backend | head -40; tail -20 "/var/log/xen/xl-$NAME.log"
    summary xen-xl # every later step needs the guest
    exit
fi
tail -F -n +1 "$LOG" 2> /dev/null | sed -u 's/\r$//' > "$OUT/guest-$NAME-live.log" &
TAIL_PID=$!
D=$(domid_now)
s=$(backend_state $BTYPE "$D" xvdb)
[ "$(xenstore-read "/local/domain/0/backend/$BTYPE/$D/$(devid xvdb)/hotplug-status" 2> /dev/null)" = connected ] &&
    ok "xvdb: hotplug-status connected (backend state $s)" || bad "xvdb: no hotplug-status connected"
holds_image "$IMGDIR/xl-xvdb.raw" && ok "the daemon holds xl-xvdb.raw" || bad "the daemon does not hold xl-xvdb.raw"
M=0
passes_go $M "xl create"

step "xl block-attach / block-detach while the guest runs"
t0=$SECONDS
if xl block-attach $NAME "$(disk xvdc "$IMGDIR/xl-xvdc.raw")" > "$OUT/xl-block-attach.log" 2>&1; then
    ok "xl block-attach xvdc ($((SECONDS - t0))s)"
    m=$(mark)
    guest_tell_until $NAME hot1 '^GUEST hot1 verified' "$BOUND" && ! said_since "$m" '^GUEST FAIL: xvdc' &&
        ok "the guest's fio on xvdc verified (crc32c)" || bad "the guest's fio on xvdc (bound ${BOUND}s)"
    t0=$SECONDS
    xl block-detach $NAME xvdc > "$OUT/xl-block-detach.log" 2>&1 && ok "xl block-detach xvdc ($((SECONDS - t0))s)" ||
        { cat "$OUT/xl-block-detach.log"; bad "xl block-detach xvdc"; }
    wait_since "$m" '^GUEST hot1 gone' "$BOUND" && ok "xvdc gone in the guest" || bad "xvdc still in the guest"
    wait_for "$BOUND" eval '! xenstore-exists /local/domain/0/backend/$BTYPE/$D/$(devid xvdc)' &&
        ok "backend dir of xvdc removed" || bad "backend dir of xvdc still there"
    wait_for "$BOUND" eval '! holds_image "$IMGDIR/xl-xvdc.raw"' && ok "the daemon released xl-xvdc.raw" ||
        bad "the daemon still holds xl-xvdc.raw"
else
    cat "$OUT/xl-block-attach.log"; bad "xl block-attach xvdc"
fi

step "refused disks: xl block-attach fails with the daemon's reason, nothing left behind"
refused() { # refused TARGET ERE: the reason xl must print
    local t0=$SECONDS rc out
    out=$(timeout "$BOUND" xl block-attach $NAME "$(disk xvdd "$1")" 2>&1)
    rc=$?
    echo "$out" | sed 's/^/  xl: /' | tail -6
    [ $rc != 0 ] && ok "xl block-attach $1 failed after $((SECONDS - t0))s" || bad "xl block-attach $1 succeeded"
    grep -qE "$2" <<< "$out" && ok "xl's output has the daemon's reason /$2/" || bad "xl's output lacks /$2/"
    # xl has returned: libxl removes nothing after that, so what is there now stays (no wait)
    if ! xenstore-exists "/local/domain/0/backend/$BTYPE/$D/$(devid xvdd)" &&
        ! xenstore-exists "/local/domain/$D/device/vbd/$(devid xvdd)"; then
        ok "no backend or frontend dir of xvdd left"
    else
        bad "xvdd nodes left in XenStore after xl block-attach failed: $(xenstore-ls -f "/local/domain/0/backend/$BTYPE/$D/$(devid xvdd)" 2>&1 | grep -E '/(state|hotplug-status|hotplug-error|online) ' | tr '\n' ' ')"
        xl block-detach $NAME xvdd > /dev/null 2>&1 # what an operator does, so the next case starts clean
    fi
    wait_for "$BOUND" eval '! xb list | grep -qw xvdd' && ok "the daemon lists no xvdd" || bad "the daemon still lists xvdd"
}
refused "$IMGDIR/xl-missing.raw" 'No such file'
refused /dev/shm/xl-outside.raw 'outside storage.allowed_dirs'

step "kill -9 the daemon mid-I/O"
m=$(mark)
if wait_since "$m" '^GUEST restart-pass [0-9]+ started' "$BOUND"; then
    base=$(disk_requests "$D" xvdb)
    wait_for "$BOUND" eval '[ "$(disk_requests "$D" xvdb)" -gt "$base" ]' && ok "xvdb requests growing past $base" ||
        bad "no xvdb request served (bound ${BOUND}s)"
    p=$(last_started "$m") old=$(daemon_pid)
    if [ $MODE = systemd ]; then
        systemctl kill -s KILL xenblk && ok "systemctl kill -s KILL xenblk (pid $old) during pass $p"
    else
        kill -KILL "$old" && ok "kill -KILL $old during pass $p"
    fi
    t0=$SECONDS
    wait_for "$BOUND" serving "$old" && ok "the daemon is back (pid $(daemon_pid)) after $((SECONDS - t0))s" ||
        bad "the daemon is not back (bound ${BOUND}s)"
    [ $MODE = systemd ] && systemctl show -P NRestarts xenblk | xargs -I{} echo "DOM0 xenblk.service NRestarts={}"
    [ "$(backend_state $BTYPE "$D" xvdb)" = 4 ] && ok "xvdb backend still Connected" || bad "xvdb backend state $(backend_state $BTYPE "$D" xvdb)"
    wait_since "$m" "^GUEST restart-pass $p verified" "$BOUND" && ok "pass $p, in flight across the kill, verified" ||
        bad "pass $p did not verify"
    passes_go "$(mark)" "after the kill"
else
    bad "no guest pass started (bound ${BOUND}s)"
fi

step "restart the daemon mid-I/O (SIGTERM hands the devices over: daemon.on_stop = keep)"
m=$(mark)
if wait_since "$m" '^GUEST restart-pass [0-9]+ started' "$BOUND"; then
    base=$(disk_requests "$D" xvdb)
    wait_for "$BOUND" eval '[ "$(disk_requests "$D" xvdb)" -gt "$base" ]' && ok "xvdb requests growing past $base" ||
        bad "no xvdb request served (bound ${BOUND}s)"
    p=$(last_started "$m") old=$(daemon_pid) t0=$SECONDS
    if [ $MODE = systemd ]; then
        systemctl restart xenblk && ok "systemctl restart xenblk during pass $p ($((SECONDS - t0))s)" || bad "systemctl restart xenblk"
    else
        kill -TERM "$old"
        wait "$SUP_PID"
        tail -1 "$OUT/restarts.log" | grep -q 'status 0$' && ok "xenblk serve exited 0 on SIGTERM during pass $p" ||
            bad "serve: $(tail -1 "$OUT/restarts.log")"
        supervise &
        SUP_PID=$!
    fi
    wait_for "$BOUND" serving "$old" && ok "the daemon is back (pid $(daemon_pid)) after $((SECONDS - t0))s" ||
        bad "the daemon is not back (bound ${BOUND}s)"
    [ "$(backend_state $BTYPE "$D" xvdb)" = 4 ] && ok "xvdb backend still Connected" || bad "xvdb backend state $(backend_state $BTYPE "$D" xvdb)"
    wait_since "$m" "^GUEST restart-pass $p verified" "$BOUND" && ok "pass $p, in flight across the restart, verified" ||
        bad "pass $p did not verify"
    passes_go "$(mark)" "after the restart"
else
    bad "no guest pass started (bound ${BOUND}s)"
fi

step "xl save -c (checkpoint, the guest goes on)"
t0=$SECONDS
if xl save -c $NAME /var/tmp/xl-ckpt.save > "$OUT/xl-save-c.log" 2>&1; then
    ok "xl save -c ($((SECONDS - t0))s; $(du -m /var/tmp/xl-ckpt.save | cut -f1) MiB)"
else
    cat "$OUT/xl-save-c.log"; bad "xl save -c"
fi
rm -f /var/tmp/xl-ckpt.save
[ -n "$D" ] && [ "$(domid_now)" = "$D" ] && ok "same domain $D runs on" || bad "domid $(domid_now) after save -c, was $D"
passes_go "$(mark)" "after xl save -c"

step "xl save + xl restore"
m=$(mark) t0=$SECONDS
if xl save $NAME /var/tmp/xl.save > "$OUT/xl-save.log" 2>&1; then
    ok "xl save ($((SECONDS - t0))s)"
    xl domid $NAME > /dev/null 2>&1 && bad "domain still there after xl save" || ok "domain $D gone after xl save"
    nothing_left "$D" "after xl save"
    t0=$SECONDS
    if xl restore /var/tmp/xl.save > "$OUT/xl-restore.log" 2>&1; then
        ok "xl restore ($((SECONDS - t0))s, domid $(domid_now), was $D)"
    else
        cat "$OUT/xl-restore.log"; bad "xl restore"
    fi
    D=$(domid_now)
    passes_go "$m" "after xl restore"
else
    cat "$OUT/xl-save.log"; bad "xl save"
fi
rm -f /var/tmp/xl.save

step "xl reboot"
m=$(mark) old=$D
if xl reboot $NAME > "$OUT/xl-reboot.log" 2>&1; then
    ok "xl reboot"
    wait_since "$m" '^GUEST ready' "$BOUND" reboot && ok "the guest booted again (domid $(domid_now), was $old)" ||
        bad "the guest did not come back (bound ${BOUND}s)"
    D=$(domid_now)
    [ "$D" != "$old" ] && xenstore-exists "/local/domain/0/backend/$BTYPE/$old" && bad "backend/$BTYPE/$old left after the reboot"
    passes_go "$m" "after xl reboot"
else
    cat "$OUT/xl-reboot.log"; bad "xl reboot"
fi

step "xl shutdown"
m=$(mark)
guest_tell_until $NAME stop '^GUEST failures=' "$BOUND" || bad "the guest did not finish its passes when told (bound ${BOUND}s)"
tail -n +$((m + 1)) "$LOG" | tr -d '\r' | grep -E '^GUEST (ok|failures|restart-io-done)'
said_since "$m" '^GUEST failures=0' && ok "the guest's workload: no failure" || bad "the guest: $(tail -n +$((m + 1)) "$LOG" | tr -d '\r' | grep -m1 '^GUEST failures=')"
t0=$SECONDS
timeout "$BOUND" xl shutdown -w $NAME > "$OUT/xl-shutdown.log" 2>&1 && ok "xl shutdown -w ($((SECONDS - t0))s)" ||
    { cat "$OUT/xl-shutdown.log"; bad "xl shutdown -w"; xl destroy $NAME 2> /dev/null; }
nothing_left "$D" "after xl shutdown"

step "restart the daemon with no guest"
old=$(daemon_pid) t0=$SECONDS
if [ $MODE = systemd ]; then
    systemctl restart xenblk && ok "systemctl restart xenblk ($((SECONDS - t0))s)" || bad "systemctl restart xenblk"
else
    kill -TERM "$old"
    wait "$SUP_PID"
    tail -1 "$OUT/restarts.log" | grep -q 'status 0$' && ok "xenblk serve exited 0 on SIGTERM" || bad "serve: $(tail -1 "$OUT/restarts.log")"
    supervise &
    SUP_PID=$!
fi
wait_for "$BOUND" serving "$old" && ok "the daemon answers again (pid $(daemon_pid))" || bad "the daemon is not back"

step "a second guest, xl destroy"
m=$(mark)
if timeout "$BOUND" xl create -q "$CFG" > "$OUT/xl-create2.log" 2>&1; then
    D=$(domid_now)
    ok "xl create after the restart (domid $D)"
    passes_go "$m" "second guest"
    xl destroy $NAME && ok "xl destroy" || bad "xl destroy"
    nothing_left "$D" "after xl destroy"
else
    cat "$OUT/xl-create2.log"; bad "xl create after the restart"
fi

step "after the guests"
tr -d '\r' < "$LOG" > "$OUT/guest-console.txt"
n=$(grep -c '^GUEST FAIL' "$OUT/guest-console.txt")
[ "$n" = 0 ] && ok "no GUEST FAIL line on the console over the whole run" || { bad "$n GUEST FAIL lines"; grep '^GUEST FAIL' "$OUT/guest-console.txt"; }
if [ $MODE = systemd ]; then
    journalctl -u xenblk --no-pager -o cat > "$OUT/serve.log" 2>&1
    systemctl stop xenblk && ok "systemctl stop xenblk" || bad "systemctl stop xenblk"
    systemctl show -P Result xenblk | grep -qx success && ok "stopped cleanly (Result=success)" || bad "Result=$(systemctl show -P Result xenblk)"
    systemctl disable xenblk > /dev/null 2>&1
else
    kill -TERM "$(daemon_pid)"
    wait "$SUP_PID"
    tail -1 "$OUT/restarts.log" | grep -q 'status 0$' && ok "xenblk serve exited 0 on SIGTERM" || bad "serve: $(tail -1 "$OUT/restarts.log")"
    modprobe xen-blkback 2> /dev/null # as the Dom0 was
fi
grep -c '"\?device.stale_connection' "$OUT/serve.log" | xargs -I{} echo "serve.log: {} device.stale_connection"
grep -ciE '"level": *"(error|critical)"|\[(error|critical) |Traceback' "$OUT/serve.log" | xargs -I{} echo "serve.log: {} error lines"
kill "$TAIL_PID" 2> /dev/null
rm -f "$IMGDIR"/xl-*.raw /dev/shm/xl-outside.raw
echo "DOM0 xl: wall time $((SECONDS - T_START))s"
summary xen-xl
