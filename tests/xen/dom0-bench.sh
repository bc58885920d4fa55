#!/bin/bash
# Dom0 side of `make xen-bench` (run by tests/xen/run.sh bench inside the test Dom0).
# One guest, three disks on identical random-data images in Dom0 tmpfs:
#   xvdb  in-kernel blkback, phy on a loop device        (xl disk spec, at guest creation)
#   xvdc  QEMU qdisk, backendtype=qdisk                   (xl disk spec, at guest creation)
#   xvdd  xenblk, vbd3 via `xenblk attach`                (after the guest is up)
# The payload (tests/xen/guest-payload.sh, xbmode=bench) runs the same fio jobs on each, job
# by job, and prints fio's JSON; bench/xen_bench.py turns the console into the table.
# Env: XEN_TEST_OUT, XEN_TEST_INITRD, XEN_BENCH_RUNTIME (seconds per job, default 5).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
source "$ROOT/tests/xen/dom0-lib.sh"
OUT=${XEN_TEST_OUT:?}
INITRD=${XEN_TEST_INITRD:?}
RUNTIME=${XEN_BENCH_RUNTIME:-5}
IMG=/dev/shm/xenblk-bench
mkdir -p "$IMG"
SERVE_PID=
platform

step "images (3 x 128 MiB, identical)"
random_image "$IMG/blkback.img" 128
cp "$IMG/blkback.img" "$IMG/qdisk.img"
cp "$IMG/blkback.img" "$IMG/xenblk.img"
loop=$(losetup -f --show --direct-io=on "$IMG/blkback.img" 2> /dev/null || losetup -f --show "$IMG/blkback.img")

cat > "$OUT/xenblk.toml" << TOML
[daemon]
backend_types = ["vbd3"]
[log]
format = "json"
level = "info"
[storage]
allowed_dirs = ["$IMG"]
TOML
start_daemon "$OUT/xenblk.toml" "$OUT/serve.log" || exit 1

step "guest"
# libxl gives the qdisk device model 60 s to start; warm it into the page cache (9p under TCG)
dm=/usr/libexec/xen-qemu-system-i386
[ -x "$dm" ] && cat "$dm" $(ldd "$dm" | grep -o '/[^ ]*') > /dev/null
name=xbbench
guest_start "$name" "$INITRD" 2 "xbmode=bench xbdisks=xvdb,xvdc,xvdd xbruntime=$RUNTIME xbreload=0" \
    "'phy:$loop,xvdb,w'" "'format=raw,vdev=xvdc,access=rw,backendtype=qdisk,target=$IMG/qdisk.img'" || bad "xl create"
domid=$(xl domid "$name")
guest_ready "$name" "$BOUND"
timeout "$BOUND" "$XENBLK" --config "$OUT/xenblk.toml" attach "$domid" "$IMG/xenblk.img" --vdev xvdd --format raw --wait &&
    ok "xenblk attach xvdd" || bad "xenblk attach xvdd"
# what each frontend negotiated (all written once the three backends are Connected)
for v in xvdb:vbd xvdc:qdisk xvdd:vbd3; do
    wait_for "$BOUND" eval '[ "$(backend_state ${v#*:} $domid ${v%:*})" = 4 ]' || bad "${v%:*} (${v#*:}) not Connected (bound ${BOUND}s)"
done
for t in vbd qdisk vbd3; do xenstore-ls -fp "/local/domain/0/backend/$t/$domid" > "$OUT/xenstore-$t.txt" 2>&1; done
xenstore-ls -fp "/local/domain/$domid/device/vbd" > "$OUT/xenstore-frontend.txt" 2>&1

step "fio (${RUNTIME}s per job and disk)"
guest_finish "$name" 1800
stop_daemon
losetup -d "$loop"
summary xen-bench
