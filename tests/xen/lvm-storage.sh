#!/bin/bash
# Dom0 side of the LVM storage check (issue 5 item 2): a real volume group on a loop
# device with a linear LV and a thin LV in a thin pool, opened through xenblk's
# block-device driver (tests/xen/lvm_storage.py does the checks).
# Runs inside the xen-vm Dom0 (device-mapper + lvm2); the host kernel has no device-mapper.
# Usage: lvm-storage.sh [WORKDIR]   (default /dev/shm/xenblk-lvm; tmpfs, so discards punch holes)
# Leaves nothing behind: the VG is removed and the loop device detached on exit.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${1:-/dev/shm/xenblk-lvm}
VG=xbtestvg
# No udev in the test Dom0: LVM creates the /dev nodes itself; no thin_check binary either.
export LVM_CONF_ARGS='devices { filter = [ "a|^/dev/loop|", "r|.*|" ] use_devicesfile = 0 }
activation { udev_sync = 0 udev_rules = 0 }
global { thin_check_executable = "" thin_repair_executable = "" }'
lvm_() { "$@" --config "$LVM_CONF_ARGS"; }

modprobe -a dm-mod dm-thin-pool || { echo "LVM FAIL: modprobe dm-mod dm-thin-pool"; exit 1; }
mkdir -p "$WORK"
truncate -s 512M "$WORK/pv.img"
loop=$(losetup -f --show "$WORK/pv.img") || { echo "LVM FAIL: losetup"; exit 1; }
cleanup() {
    lvm_ vgremove -q -f "$VG" > /dev/null 2>&1
    lvm_ pvremove -q -f "$loop" > /dev/null 2>&1
    losetup -d "$loop"
    rm -f "$WORK/pv.img"
}
trap cleanup EXIT

set -e
lvm_ pvcreate -q "$loop"
lvm_ vgcreate -q "$VG" "$loop"
lvm_ lvcreate -q -y -L 64M -n lin "$VG"
lvm_ lvcreate -q -y -L 128M --thinpool pool "$VG"
lvm_ lvcreate -q -y -V 256M --thin -n thin "$VG/pool"
lvm_ lvs -o lv_name,lv_size,lv_attr,data_percent "$VG"
set +e

"$ROOT/.venv/bin/python" "$ROOT/tests/xen/lvm_storage.py" --vg "$VG"
