# Helpers for the Dom0 scripts of `make xen-test`, `make xen-restart` and `make xen-bench`
# (sourced, bash). They run inside a test Dom0 of either flavour of the harness:
#   d12: Debian 12, Xen 4.17, C xenstored, the harness's own PID 1 (no systemd, no udev)
#   d13: Debian 13, Xen 4.20, oxenstored, systemd as PID 1 with systemd-udevd
# so nothing here names a Xen version, a kernel or an init system. Harness contract (env):
#   XEN_TEST_OUT      a directory shared read-write with the host (logs)
#   XEN_TEST_INITRD   the guest initramfs (tests/xen/guest-payload.sh as its payload)
#   XEN_TEST_FLAVOUR  d12 | d13 (checked against what is running, see platform)
#   XEN_GUEST_KERNEL  the PV guest kernel (default: Dom0's own, /boot/vmlinuz-$(uname -r))
#   PATH              with the Xen tools; `xen-vm-guest wait NAME [--timeout S]`
#
# Tests never race the clock: every wait here polls a condition (a console line, a XenStore
# node, a counter, a process) once a second, and its timeout is only a generous failure bound.
ROOT=${ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
if ! command -v xl > /dev/null 2>&1; then # the harness did not put the Xen tools on PATH
    for d in $(ls -d /usr/lib/xen-*/bin 2> /dev/null | sort -rV); do PATH=$d:$PATH; break; done
fi
export PATH=$PATH:/usr/sbin:/sbin
XENBLK="$ROOT/.venv/bin/xenblk"
CONSOLE_DIR=${XEN_CONSOLE_DIR:-/var/log/xen/console}
GUEST_KERNEL=${XEN_GUEST_KERNEL:-/boot/vmlinuz-$(uname -r)}
METRICS_PORT=${XEN_TEST_METRICS_PORT:-9469}
# The failure bound of a wait (seconds). Generous on purpose: under TCG on two shared cores a
# Python start alone took 60-110 s in Dom0 on a loaded machine; a bound only ends a hung run.
BOUND=${XEN_TEST_BOUND:-900}
fails=0

# --- results: one line per check, and a summary of the steps at the end -------------------
STEPS=() cur_step="" step_ok=0 step_bad=0
ok() { echo "DOM0 ok: $*"; step_ok=$((step_ok + 1)); }
bad() { echo "DOM0 FAIL: $*"; fails=$((fails + 1)); step_bad=$((step_bad + 1)); }
step_end() {
    [ -n "$cur_step" ] && STEPS+=("$step_ok|$step_bad|$cur_step")
    cur_step="" step_ok=0 step_bad=0
}
step() { step_end; cur_step=$*; echo "== $* ($(date -u +%T))"; }
skip() { echo "(skipped: $*)"; step_ok=-1; } # the current step did not run
# add_fails FILE: count the DOM0 FAIL lines a background helper wrote to FILE
add_fails() {
    local n; n=$(grep -c '^DOM0 FAIL' "$1" 2> /dev/null)
    fails=$((fails + ${n:-0})) step_bad=$((step_bad + ${n:-0}))
}
# summary NAME: the steps and their results, then "NAME: N failures"; returns the exit status
summary() {
    step_end
    local s o b r
    echo "== summary: $1 on ${XEN_TEST_FLAVOUR:-?} (Xen $XEN_VERSION, $XENSTORED_NAME, Dom0 kernel $(uname -r))"
    for s in "${STEPS[@]}"; do
        o=${s%%|*} b=${s#*|} b=${b%%|*}
        if [ "$o" = -1 ]; then r=SKIP; elif [ "$b" = 0 ]; then r=PASS; else r=FAIL; fi
        printf 'DOM0 step %-4s %-60s %s ok, %s failed\n' "$r" "${s#*|*|}" "$((o < 0 ? 0 : o))" "$b"
    done
    echo "$1: $fails failures"
    return $((fails > 100 ? 100 : fails))
}

# platform: which Xen, which xenstored, which kernels, which init; checked against the flavour
platform() {
    step "platform"
    local info; info=$(xl info 2> /dev/null)
    XEN_VERSION=$(awk '$1 == "xen_version" {print $3}' <<< "$info")
    XENSTORED_NAME=$(pgrep -x oxenstored > /dev/null && echo oxenstored ||
        { pgrep -x xenstored > /dev/null && echo xenstored; } || echo none)
    local init udev
    init=$(cat /proc/1/comm)
    udev=$([ -S /run/udev/control ] && echo running || echo none)
    echo "DOM0 flavour: ${XEN_TEST_FLAVOUR:-unset}"
    echo "DOM0 xl info: $(grep -E '^xen_(version|caps)' <<< "$info" | tr -s ' ' | paste -sd ';')"
    echo "DOM0 xenstored: $(pgrep -a xenstored | head -1)"
    echo "DOM0 kernel: $(uname -r); guest kernel: $GUEST_KERNEL"
    echo "DOM0 init (PID 1): $init; udev: $udev; Xen tools: $(dirname "$(command -v xl)")"
    [ -n "$XEN_VERSION" ] && ok "Xen $XEN_VERSION answers xl info" || bad "xl info gives no xen_version"
    [ "$XENSTORED_NAME" != none ] && ok "$XENSTORED_NAME running" || bad "no xenstored running"
    [ -r "$GUEST_KERNEL" ] && ok "guest kernel $GUEST_KERNEL" || bad "guest kernel $GUEST_KERNEL not readable"
    case ${XEN_TEST_FLAVOUR:-} in # the harness booted what it says it booted
        d12) [[ $XEN_VERSION == 4.17.* && $XENSTORED_NAME == xenstored ]] &&
            ok "d12: Xen 4.17 with C xenstored" || bad "d12 expects Xen 4.17 + xenstored: $XEN_VERSION $XENSTORED_NAME" ;;
        d13) [[ $XEN_VERSION == 4.20.* && $XENSTORED_NAME == oxenstored && $init == systemd ]] &&
            ok "d13: Xen 4.20 with oxenstored under systemd" ||
            bad "d13 expects Xen 4.20 + oxenstored + systemd: $XEN_VERSION $XENSTORED_NAME $init" ;;
    esac
    # the metrics endpoint listens on 127.0.0.1; a Dom0 without an init system leaves lo down
    ip link set lo up 2> /dev/null || true
}

# wait_for TIMEOUT COMMAND...: poll COMMAND once a second until it succeeds (1 = timed out)
wait_for() {
    local limit=$1 t0=$SECONDS
    shift
    until "$@"; do
        [ $((SECONDS - t0)) -ge "$limit" ] && return 1
        sleep 1
    done
}

# --- storage ------------------------------------------------------------------------------
# LVM and device-mapper create their /dev nodes themselves, with udev or without: d12 has no
# udev; in d13 systemd-udevd runs, and these settings make LVM/libdevmapper flag their
# uevents so that the dm/lvm udev rules leave the nodes alone (no double creation, no wait
# for a udev cookie that rules may never release). No thin_check binary is needed either.
LVM_CONF_ARGS='devices { filter = [ "a|^/dev/loop|", "r|.*|" ] use_devicesfile = 0 }
activation { udev_sync = 0 udev_rules = 0 }
global { thin_check_executable = "" thin_repair_executable = "" }'
export LVM_CONF_ARGS DM_DISABLE_UDEV=1
lvm_() { "$@" --config "$LVM_CONF_ARGS"; }

# random_image PATH MIB: a raw file of MIB MiB of random data (in tmpfs when under /dev/shm)
random_image() { dd if=/dev/urandom of="$1" bs=1M count="$2" status=none; }

# thin_lv WORKDIR VG LV MIB: a thin LV of MIB MiB in a fresh VG on a loop device; prints its path
thin_lv() {
    local work=$1 vg=$2 lv=$3 mib=$4 loop
    modprobe -a dm-mod dm-thin-pool || return 1
    truncate -s $((mib * 2 + 64))M "$work/$vg.pv"
    loop=$(losetup -f --show "$work/$vg.pv") || return 1
    lvm_ pvcreate -q "$loop" > /dev/null && lvm_ vgcreate -q "$vg" "$loop" > /dev/null &&
        lvm_ lvcreate -q -y -L $((mib * 2))M --thinpool pool "$vg" > /dev/null 2>&1 &&
        lvm_ lvcreate -q -y -V "${mib}M" --thin -n "$lv" "$vg/pool" > /dev/null 2>&1 || return 1
    wait_for "$BOUND" test -b "/dev/$vg/$lv" || return 1
    echo "/dev/$vg/$lv"
}

# read_is_zero PATH OFFSET_MIB LEN_MIB: the range reads back as zeros
read_is_zero() { # (a pipe: the test Dom0 may have no /dev/fd for <(...))
    dd if="$1" bs=1M skip="$2" count="$3" status=none | cmp -s -n $(($3 << 20)) - /dev/zero
}

# --- the daemon ---------------------------------------------------------------------------
# write_config FILE IMAGE_DIR [LOG_LEVEL]: the daemon's config for a test (vbd3 works with
# both flavours' libxl; the metrics endpoint is what the restart test watches)
write_config() {
    cat > "$1" << TOML
[daemon]
backend_types = ["vbd3"]
run_dir = "/run/xenblk"
state_dir = "/var/lib/xenblk"
[log]
format = "json"
level = "${3:-debug}"
[metrics]
listen = "127.0.0.1:$METRICS_PORT"
[storage]
allowed_dirs = ["$2"]
# the qcow2 of dom0-test sits over a base image in the same directory
backing_dirs = ["$2"]
# block devices are named explicitly: the thin LV of dom0-test, the dm-error device of dom0-restart
allowed_devices = ["/dev/xbtvg/*", "/dev/mapper/xbtvg-*", "/dev/mapper/xbdmerr", "/dev/dm-*"]
TOML
}

# start_daemon CONFIG LOG: xenblk serve in the background, as the systemd unit runs it; sets SERVE_PID
start_daemon() {
    "$XENBLK" --config "$1" serve > "$2" 2>&1 &
    SERVE_PID=$!
    local t0=$SECONDS
    until "$XENBLK" --config "$1" list > /dev/null 2>&1; do
        if ! kill -0 "$SERVE_PID" 2> /dev/null || [ $((SECONDS - t0)) -ge "$BOUND" ]; then
            bad "xenblk serve did not come up"; tail -30 "$2"; return 1
        fi
        sleep 1
    done
    ok "xenblk serve up (pid $SERVE_PID) after $((SECONDS - t0))s"
}

# stop_daemon: SIGTERM, it must exit 0
stop_daemon() {
    [ -n "${SERVE_PID:-}" ] || return 0
    kill -TERM "$SERVE_PID" 2> /dev/null
    if ! wait_for "$BOUND" eval '! kill -0 "$SERVE_PID" 2> /dev/null'; then
        bad "xenblk serve still running ${BOUND}s after SIGTERM"; kill -KILL "$SERVE_PID"
    fi
    wait "$SERVE_PID"
    local rc=$?
    [ $rc = 0 ] && ok "xenblk serve exited 0 on SIGTERM" || bad "xenblk serve exit status $rc on SIGTERM"
    SERVE_PID=
}

# metrics: the daemon's /metrics text (bash's /dev/tcp: neither Dom0 is sure to have curl, and
# a Python start per scrape is slow under TCG); empty if the daemon does not answer
metrics() {
    timeout 30 bash -c 'exec 7<> "/dev/tcp/127.0.0.1/$1" || exit 1
        printf "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n" >&7; cat <&7' _ "$METRICS_PORT" 2> /dev/null |
        tr -d '\r' | sed '1,/^$/d'
}

# disk_requests DOMID VDEV: requests the running daemon completed on that disk (all ops)
disk_requests() {
    metrics | awk -v d="domid=\"$1\"" -v v1="vdev=\"$2\"" -v v2="vdev=\"$(devid "$2")\"" \
        '/^xenblk_requests_total\{/ && index($0, d) && (index($0, v1) || index($0, v2)) {s += $NF}
         END {printf "%d\n", s}'
}

# backend_state TYPE DOMID VDEV: the backend's XenbusState
backend_state() { xenstore-read "/local/domain/0/backend/$1/$2/$(devid "$3")/state" 2> /dev/null; }
frontend_state() { xenstore-read "/local/domain/$1/device/vbd/$(devid "$2")/state" 2> /dev/null; }

# --- guests -------------------------------------------------------------------------------
# guest_start NAME INITRD VCPUS EXTRA ['XL DISK SPEC']...: a PV guest (like xen-vm-guest start,
# but with several vCPUs so blkfront can use several queues); disk specs come quoted
guest_start() {
    local name=$1 initrd=$2 vcpus=$3 extra=$4 cfg=/run/xenblk-test-$1.cfg
    shift 4
    local disks; disks=$(IFS=,; echo "$*")
    cat > "$cfg" << CFG
name = "$name"
type = "pv"
kernel = "$GUEST_KERNEL"
ramdisk = "$initrd"
extra = "console=hvc0 quiet $extra"
memory = ${XEN_GUEST_MEM:-768}
vcpus = $vcpus
on_poweroff = "destroy"
on_reboot = "destroy"
on_crash = "destroy"
disk = [ $disks ]
CFG
    rm -f "$CONSOLE_DIR/guest-$name.log"
    xl create -q "$cfg" || return 1
    echo "guest $name started, domid $(xl domid "$name")"
    # everything the scripts learn from the guest comes from xenconsoled's log of its console
    if ! wait_for "$BOUND" test -e "$CONSOLE_DIR/guest-$name.log"; then
        bad "no console log $CONSOLE_DIR/guest-$name.log (xenconsoled must run with --log=guest)"
        return 1
    fi
    # a live copy of the console in the shared log dir, to watch a run from the host
    if [ -n "${XEN_TEST_OUT:-}" ]; then
        tail -F -n +1 "$CONSOLE_DIR/guest-$name.log" 2> /dev/null | sed -u 's/\r$//' > "$XEN_TEST_OUT/guest-$name-live.log" &
    fi
}

# guest_said NAME ERE: the guest's console has a line matching ERE
guest_said() { grep -qsE "$2" "$CONSOLE_DIR/guest-$1.log"; }

# guest_wait NAME ERE TIMEOUT [STOP_ERE]: wait for a console line matching ERE. 1: timed out;
# 2: the guest is gone or printed a line matching STOP_ERE first (no point waiting longer)
guest_wait() {
    local name=$1 want=$2 limit=$3 stop=${4:-} t0=$SECONDS
    until guest_said "$name" "$want"; do
        # re-check WANT after a stop condition: the guest may have printed both meanwhile
        if { [ -n "$stop" ] && guest_said "$name" "$stop"; } || ! xl domid "$name" > /dev/null 2>&1; then
            guest_said "$name" "$want" && return 0
            return 2
        fi
        [ $((SECONDS - t0)) -ge "$limit" ] && return 1
        sleep 1
    done
}

# guest_ready NAME TIMEOUT: wait for the payload's "GUEST ready" line (blkfront reloaded)
guest_ready() {
    guest_wait "$1" '^GUEST ready' "$2" && return 0
    bad "guest $1 not ready (bound ${2}s)"; tr -d '\r' < "$CONSOLE_DIR/guest-$1.log"; return 1
}

# guest_tell NAME WORD: a line "xbctl WORD" on the guest's console input. xenconsoled feeds
# what is written to the guest's pty (XenStore console/tty) into the console ring's input
# side; the payload reads its console (guest-payload.sh: dom0_said). A channel of its own:
# it does not depend on the daemon under test, which Dom0 is killing meanwhile.
guest_tell() {
    local tty; tty=$(xenstore-read "/local/domain/$(xl domid "$1" 2> /dev/null)/console/tty" 2> /dev/null)
    [ -n "$tty" ] && [ -c "$tty" ] && printf 'xbctl %s\n' "$2" > "$tty"
}

# guest_tell_until NAME WORD ERE TIMEOUT: tell the guest WORD until it answers with a line
# matching ERE (repeated every 10 s: a line sent before the payload listens is not lost for good)
guest_tell_until() {
    local name=$1 word=$2 want=$3 limit=$4 t0=$SECONDS last=-10
    until guest_said "$name" "$want"; do
        [ $((SECONDS - t0)) -ge "$limit" ] && return 1
        xl domid "$name" > /dev/null 2>&1 || { guest_said "$name" "$want" || return 2; }
        if [ $((SECONDS - last)) -ge 10 ]; then guest_tell "$name" "$word"; last=$SECONDS; fi
        sleep 1
    done
}

# guest_finish NAME TIMEOUT: wait for the payload to power off; console in guest-console.txt
guest_finish() {
    local out rc
    out=$(xen-vm-guest wait "$1" --timeout "$2")
    rc=$?
    printf '%s\n' "$out" > "$OUT/guest-console.txt"
    grep -E '^GUEST ' <<< "$out"
    [ $rc = 0 ] && ok "guest payload passed" || bad "guest payload exit status $rc (console: guest-console.txt)"
}

# devid VDEV: xvdX -> 202 << 8 | index << 4
devid() { local i; i=$(printf '%d' "'${1#xvd}"); echo $(((202 << 8) | ((i - 97) << 4))); }
