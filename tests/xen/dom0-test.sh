#!/bin/bash
# Dom0 side of `make xen-test`: runs inside the xen-vm Dom0 (real Xen 4.17, real
# xenstored, gntdev, evtchn). Serves a PV guest's disks with `xenblk serve` on the
# real platform, as the systemd unit would, and checks what the guest reports.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${XEN_TEST_OUT:?}
XENBLK="$ROOT/.venv/bin/xenblk"
export PATH=/usr/lib/xen-4.17/bin:$PATH
fail=0
step() { echo "== $*"; }
check() { if "$@"; then echo "ok: $*"; else echo "FAIL: $*"; fail=$((fail + 1)); fi; }

img=/dev/shm/xenblk-images
mkdir -p $img
step "images"
dd if=/dev/urandom of=$img/raw.img bs=1M count=64 status=none
qemu-img create -q -f raw $img/base.raw 64M
qemu-img create -q -f qcow2 -b $img/base.raw -F raw $img/disk.qcow2
truncate -s 200M $img/pv.img
loop=$(losetup -f --show $img/pv.img)
pvcreate -q "$loop" && vgcreate -q xbvg "$loop" && lvcreate -q -y -L 64M -n lin xbvg
check test -b /dev/xbvg/lin

cat > $OUT/xenblk.toml <<TOML
[daemon]
backend_types = ["vbd3"]
run_dir = "$OUT/run"
state_dir = "$OUT/state"
[log]
format = "json"
level = "debug"
[storage]
allowed_dirs = ["$img", "/dev"]
TOML

step "xenblk serve (real platform)"
"$XENBLK" --config $OUT/xenblk.toml serve > $OUT/serve.log 2>&1 &
serve=$!
sleep 3
check kill -0 $serve

step "guest"
xen-vm-guest start xbg "$XEN_TEST_INITRD" --mem 512
d=$(xl domid xbg)
sleep 5
check "$XENBLK" --config $OUT/xenblk.toml attach "$d" $img/raw.img --vdev xvdb --wait --timeout 120
check "$XENBLK" --config $OUT/xenblk.toml attach "$d" qcow2:$img/disk.qcow2 --vdev xvdc --wait --timeout 120
check "$XENBLK" --config $OUT/xenblk.toml attach "$d" /dev/xbvg/lin --vdev xvdd --wait --timeout 120
"$XENBLK" --config $OUT/xenblk.toml list
xenstore-ls -fp /local/domain/0/backend/vbd3 > $OUT/xenstore-backend.txt 2>&1
out=$(xen-vm-guest wait xbg --timeout 900); rc=$?
echo "$out" > $OUT/guest-console.txt
grep -E '^GUEST' <<< "$out"
check test "$rc" = 0

step "after the guest"
check qemu-img check $img/disk.qcow2
alloc=$(du -k $img/raw.img | cut -f1)
echo "raw.img allocated after discard: ${alloc} KiB of 65536"
check test "$alloc" -lt 65536
kill -TERM $serve; wait $serve
echo "serve exit status $?"
xenstore-rm /local/domain/0/backend/vbd3/$d 2>/dev/null
echo "xen-test failures: $fail"
exit $fail
