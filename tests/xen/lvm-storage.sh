#!/bin/bash
# Dom0 side of the LVM storage check (issue 5 item 2): a real volume group on a loop
# device with a linear LV and a thin LV in a thin pool, opened through xenblk's
# block-device driver (tests/xen/lvm_storage.py does the checks).
# Runs inside the test Dom0 of either flavour (device-mapper + lvm2); the host kernel has no
# device-mapper. LVM makes its /dev nodes itself with or without udev (dom0-lib.sh).
# Usage: lvm-storage.sh [WORKDIR]   (default /dev/shm/xenblk-lvm; tmpfs, so discards punch holes)
# Leaves nothing behind: the VG is removed and the loop device detached on exit.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
source "$ROOT/tests/xen/dom0-lib.sh"
WORK=${1:-/dev/shm/xenblk-lvm}
VG=xbtestvg
platform > /dev/null # the Xen tools on PATH, XEN_VERSION etc.; the banner below is the short form
echo "LVM platform: ${XEN_TEST_FLAVOUR:-?} Xen $XEN_VERSION $XENSTORED_NAME kernel $(uname -r)" \
    "lvm $(lvm version 2> /dev/null | awk '/LVM version/ {print $3}') udev $([ -S /run/udev/control ] && echo running || echo none)"

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
for lv in lin thin; do
    wait_for "$BOUND" test -b "/dev/$VG/$lv" || { echo "LVM FAIL: no /dev/$VG/$lv (bound ${BOUND}s)"; exit 1; }
done

"$ROOT/.venv/bin/python" "$ROOT/tests/xen/lvm_storage.py" --vg "$VG"
