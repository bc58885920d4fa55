# Helpers for the Dom0 scripts of `make xen-test` and `make xen-bench` (sourced, bash).
# They run inside the xen-vm Dom0: real Xen 4.17, xenstored, xl, gntdev, evtchn, lvm2.
export PATH=/usr/lib/xen-4.17/bin:$PATH
ROOT=${ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
XENBLK="$ROOT/.venv/bin/xenblk"
CONSOLE_DIR=/var/log/xen/console
fails=0

ok() { echo "DOM0 ok: $*"; }
bad() { echo "DOM0 FAIL: $*"; fails=$((fails + 1)); }
step() { echo "== $* ($(date -u +%T))"; }

# No udev in the test Dom0: LVM creates the /dev nodes itself; no thin_check binary either.
LVM_CONF_ARGS='devices { filter = [ "a|^/dev/loop|", "r|.*|" ] use_devicesfile = 0 }
activation { udev_sync = 0 udev_rules = 0 }
global { thin_check_executable = "" thin_repair_executable = "" }'
export LVM_CONF_ARGS
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
    echo "/dev/$vg/$lv"
}

# guest_start NAME INITRD VCPUS EXTRA ['XL DISK SPEC']...: a PV guest (like xen-vm-guest start,
# but with several vCPUs so blkfront can use several queues); disk specs come quoted
guest_start() {
    local name=$1 initrd=$2 vcpus=$3 extra=$4 cfg=/run/xenblk-test-$1.cfg
    shift 4
    local disks; disks=$(IFS=,; echo "$*")
    cat > "$cfg" << CFG
name = "$name"
type = "pv"
kernel = "/boot/vmlinuz-$(uname -r)"
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
    # a live copy of the console in the shared log dir, to watch a run from the host
    if [ -n "${XEN_TEST_OUT:-}" ]; then
        tail -F -n +1 "$CONSOLE_DIR/guest-$name.log" 2> /dev/null | sed -u 's/\r$//' > "$XEN_TEST_OUT/guest-$name-live.log" &
    fi
}

# guest_ready NAME TIMEOUT: wait for the payload's "GUEST ready" line (blkfront reloaded)
guest_ready() {
    local t=0
    until grep -qs 'GUEST ready' "$CONSOLE_DIR/guest-$1.log"; do
        [ $t -ge "$2" ] && { bad "guest $1 not ready after ${2}s"; tr -d '\r' < "$CONSOLE_DIR/guest-$1.log"; return 1; }
        sleep 1; t=$((t + 1))
    done
}

# devid VDEV: xvdX -> 202 << 8 | index << 4
devid() { local i; i=$(printf '%d' "'${1#xvd}"); echo $(((202 << 8) | ((i - 97) << 4))); }

# read_is_zero PATH OFFSET_MIB LEN_MIB: the range reads back as zeros
read_is_zero() { # (a pipe: the test Dom0 has no /dev/fd for <(...))
    dd if="$1" bs=1M skip="$2" count="$3" status=none | cmp -s -n $(($3 << 20)) - /dev/zero
}

# start_daemon CONFIG LOG: xenblk serve in the background, as the systemd unit runs it; sets SERVE_PID
start_daemon() {
    "$XENBLK" --config "$1" serve > "$2" 2>&1 &
    SERVE_PID=$!
    local t=0
    until "$XENBLK" --config "$1" list > /dev/null 2>&1; do
        if ! kill -0 "$SERVE_PID" 2> /dev/null || [ $t -ge 60 ]; then
            bad "xenblk serve did not come up"; tail -30 "$2"; return 1
        fi
        sleep 1; t=$((t + 1))
    done
    ok "xenblk serve up (pid $SERVE_PID) after ${t}s"
}

# stop_daemon: SIGTERM, it must exit 0 within 60 s
stop_daemon() {
    [ -n "${SERVE_PID:-}" ] || return 0
    kill -TERM "$SERVE_PID" 2> /dev/null
    local t=0
    while kill -0 "$SERVE_PID" 2> /dev/null && [ $t -lt 60 ]; do sleep 1; t=$((t + 1)); done
    if kill -0 "$SERVE_PID" 2> /dev/null; then
        bad "xenblk serve still running 60s after SIGTERM"; kill -KILL "$SERVE_PID"
    fi
    wait "$SERVE_PID"
    local rc=$?
    [ $rc = 0 ] && ok "xenblk serve exited 0 on SIGTERM" || bad "xenblk serve exit status $rc on SIGTERM"
    SERVE_PID=
}
