#!/bin/sh
# Guest side of `make xen-test` (busybox sh inside a PV guest; stock Linux blkfront).
# Reloads blkfront with multi-page rings and several queues allowed, waits for the
# disks xenblk serves (xvdb raw, xvdc qcow2 over a backing file, xvdd LVM), then
# verifies data with fio, discards, and unbinds/rebinds the driver.
# Every result line starts with GUEST; the exit status is the number of failures.
fail=0
ok() { echo "GUEST ok $*"; }
bad() { echo "GUEST FAIL $*"; fail=$((fail + 1)); }

mod=$(grep blkfront /lib/modules/order)
rmmod xen_blkfront 2>/dev/null
insmod /lib/modules/$mod max_ring_page_order=4 max_queues=4 max_indirect_segments=256 || bad "insmod blkfront with parameters"
echo READY > /dev/hvc0 2>/dev/null

disks="xvdb xvdc xvdd"
for d in $disks; do
    t=0
    until [ -b /dev/$d ]; do
        [ $t -ge 240 ] && { bad "$d did not appear"; break; }
        sleep 1; t=$((t + 1))
    done
done
dmesg | grep -i 'blkfront' | sed 's/^/GUEST dmesg /'

for d in $disks; do
    [ -b /dev/$d ] || continue
    echo "GUEST $d sectors=$(cat /sys/block/$d/size) queues=$(ls /sys/block/$d/mq | wc -l) max_segments=$(cat /sys/block/$d/queue/max_segments) discard_max=$(cat /sys/block/$d/queue/discard_max_bytes) write_cache=$(cat /sys/block/$d/queue/write_cache)"
    io="--filename=/dev/$d --bs=4k --ioengine=libaio --iodepth=16 --direct=1 --eta=never"
    if fio --name=verify-$d $io --rw=randwrite --size=8M --verify=crc32c --do_verify=1 --output=/tmp/v-$d.txt; then
        ok "fio verify $d"
    else
        bad "fio verify $d: $(grep -m3 -i 'err' /tmp/v-$d.txt | tr '\n' ' ')"
    fi
    if fio --name=big-$d --filename=/dev/$d --bs=1M --ioengine=libaio --iodepth=4 --direct=1 --rw=write --size=8M \
        --offset=16M --verify=crc32c --do_verify=1 --eta=never --output=/tmp/b-$d.txt; then
        ok "fio 1M (indirect) verify $d"
    else
        bad "fio 1M verify $d"
    fi
done

# discard reaches the image (the host checks the allocation afterwards)
if [ -b /dev/xvdb ]; then
    if blkdiscard -o 33554432 -l 16777216 /dev/xvdb; then ok "blkdiscard xvdb"; else bad "blkdiscard xvdb"; fi
fi

# driver unbind/bind: the frontend closes and reconnects; data written before must survive
if [ -b /dev/xvdc ]; then
    dd if=/dev/urandom of=/tmp/pat bs=4096 count=16 2>/dev/null
    dd if=/tmp/pat of=/dev/xvdc bs=4096 seek=100 count=16 oflag=direct conv=fsync 2>/dev/null
    dev=$(basename "$(readlink /sys/block/xvdc/device)")
    echo "$dev" > /sys/bus/xen/drivers/vbd/unbind
    sleep 2
    echo "$dev" > /sys/bus/xen/drivers/vbd/bind
    t=0; until [ -b /dev/xvdc ] || [ $t -ge 60 ]; do sleep 1; t=$((t + 1)); done
    dd if=/dev/xvdc of=/tmp/back bs=4096 skip=100 count=16 iflag=direct 2>/dev/null
    if cmp -s /tmp/pat /tmp/back; then ok "data survives unbind/bind of $dev"; else bad "data after unbind/bind of $dev"; fi
fi
sync
echo "GUEST failures=$fail"
exit $fail
