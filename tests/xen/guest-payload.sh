#!/bin/sh
# Payload of the PV guest of `make xen-test` and `make xen-bench` (busybox sh + fio inside
# the guest; the stock Linux blkfront). Build: xen-vm guest-initrd OUT.cpio.gz THIS_FILE.
#
# Kernel arguments (xl `extra`):
#   xbdisks=xvdb,xvdc,...   the disks to wait for (attached after boot, by the Dom0 script)
#   xbmode=test|bench|restart|xl  test: verify, discard, unbind/bind; bench: the fio table jobs;
#                           restart: crc32c fio passes on xvdb until Dom0 says stop (Dom0 kills
#                           the daemon meanwhile, each kill triggered by a pass marker), then the
#                           dm-error disk (xvdd) reads OK in its good half and fails in its bad half;
#                           xl: restart's passes on xvdb while Dom0 drives xl (save, restore, kill...),
#                           plus a verified fio run on each disk Dom0 hot-plugs as xvdc ("xbctl hotN");
#                           after "stop" it prints its result and waits for `xl shutdown`
#   xbmaxpasses=N           restart: failure bound if Dom0 never says stop (default 100000)
#   xbpassmib=N             restart: MiB written and verified per pass (default 16; 1 makes
#                           passes short, so a kill can also land between two passes)
#   xbregions=N             restart: passes rotate over N regions of 16 MiB (default 4; more
#                           regions = every pass allocates, for a fresh qcow2)
#   xbqueues=N              test: the number of blk-mq queues every disk must have
#   xbruntime=S             bench: seconds per fio job (default 5)
#   xbreload=0|1            reload blkfront with bigger limits first (default 1); 0 when disks are
#                           attached at guest creation: a closed blkfront device cannot reconnect
#
# It reloads blkfront with 4-page rings, up to 4 queues and 64 indirect segments allowed
# (with persistent grants blkfront preallocates a page per grant: (segments + 1) x ring
# slots x queues x disks; 16-page rings with 256 segments OOM a 512 MB guest), prints "GUEST ready" (the Dom0 script attaches the disks only then), waits for
# the disks, and prints one "GUEST ok: ..." or "GUEST FAIL: ..." line per check.
# Nothing here waits for "long enough": the guest prints progress markers Dom0 acts on, and
# Dom0 answers with "xbctl WORD" lines on the guest's console input (dom0-lib.sh guest_tell).
# Exit status: the number of failures (0 = all passed).
mode=test disks=xvdb queues=1 runtime=5 reload=1 maxpasses=100000 passmib=16 regions=4
for a in $(cat /proc/cmdline); do
    case $a in
        xbdisks=*) disks=$(echo "${a#*=}" | tr , ' ') ;;
        xbmode=*) mode=${a#*=} ;;
        xbqueues=*) queues=${a#*=} ;;
        xbruntime=*) runtime=${a#*=} ;;
        xbreload=*) reload=${a#*=} ;;
        xbmaxpasses=*) maxpasses=${a#*=} ;;
        xbpassmib=*) passmib=${a#*=} ;;
        xbregions=*) regions=${a#*=} ;;
    esac
done
fail=0
ok() { echo "GUEST ok: $*"; }
bad() { echo "GUEST FAIL: $*"; fail=$((fail + 1)); }

# What Dom0 says: "xbctl WORD" lines on the console input (xenconsoled feeds the Dom0 side of
# the guest's pty into the console ring). A background reader keeps them in /tmp/xbctl. Its
# stdin is named explicitly: without job control an asynchronous list would get /dev/null.
: > /tmp/xbctl
(while read -r w a; do [ "$w" = xbctl ] && echo "$a" >> /tmp/xbctl; done) < /dev/console &
dom0_said() { grep -qx "$1" /tmp/xbctl; }
# dom0_wait WORD BOUND: poll for WORD once a second; BOUND (seconds) is only a failure bound
dom0_wait() {
    local t=0
    until dom0_said "$1"; do
        [ $t -ge "$2" ] && return 1
        sleep 1; t=$((t + 1))
    done
}

if [ "$reload" = 1 ]; then
    mod=$(grep blkfront /lib/modules/order)
    rmmod xen_blkfront 2> /dev/null
    insmod "/lib/modules/$mod" max_ring_page_order=2 max_queues=4 max_indirect_segments=64 ||
        bad "insmod blkfront max_ring_page_order=2 max_queues=4 max_indirect_segments=64"
fi
echo "GUEST ready mode=$mode disks=$disks vcpus=$(nproc)"

# xenbus_view: what this guest's xenbus and blkfront see (printed while a wait drags on)
xenbus_view() {
    local x
    for x in /sys/bus/xen/devices/vbd-*; do
        [ -e "$x" ] || continue
        echo "GUEST   ${x##*/}: nodename=$(cat $x/nodename 2> /dev/null) state=$(cat $x/state 2> /dev/null)" \
            "driver=$(basename "$(readlink $x/driver 2> /dev/null)" 2> /dev/null)"
    done
    dmesg | grep -i -e vbd -e blkfront -e xenbus | tail -8 | sed 's/^/GUEST   dmesg: /'
}

# wait_disks TIMEOUT: every disk in $disks present (block node and a non-zero size)
wait_disks() {
    local t=0 d missing
    while :; do
        missing=""
        for d in $disks; do
            [ -b /dev/$d ] && [ "$(cat /sys/block/$d/size 2> /dev/null)" -gt 0 ] 2> /dev/null || missing="$missing $d"
        done
        [ -z "$missing" ] && return 0
        [ $t -ge "$1" ] && { bad "disks missing after ${1}s:$missing"; xenbus_view; return 1; }
        [ $t -gt 0 ] && [ $((t % 60)) = 0 ] && { echo "GUEST waiting ${t}s for:$missing"; xenbus_view; }
        sleep 1; t=$((t + 1))
    done
}

# negotiated DISK: print and check what blkfront agreed with the backend
negotiated() {
    local d=$1 q=/sys/block/$1/queue
    local nq; nq=$(ls /sys/block/$d/mq | wc -l)
    local line; line=$(dmesg | grep "blkfront: $d:" | tail -1)
    echo "GUEST $d: sectors=$(cat /sys/block/$d/size) ro=$(cat /sys/block/$d/ro) queues=$nq" \
        "max_segments=$(cat $q/max_segments) max_hw_sectors_kb=$(cat $q/max_hw_sectors_kb)" \
        "write_cache=\"$(cat $q/write_cache)\" fua=$(cat $q/fua) discard_max_bytes=$(cat $q/discard_max_bytes)" \
        "discard_granularity=$(cat $q/discard_granularity) logical_block=$(cat $q/logical_block_size)" \
        "physical_block=$(cat $q/physical_block_size)"
    echo "GUEST $d: dmesg: ${line#*blkfront: }"
    [ "$nq" = "$queues" ] && ok "$d: $nq blk-mq queues" || bad "$d: $nq blk-mq queues, expected $queues"
    # without indirect descriptors a request carries at most 11 segments
    [ "$(cat $q/max_segments)" -gt 11 ] && ok "$d: indirect descriptors (max_segments $(cat $q/max_segments))" ||
        bad "$d: no indirect descriptors (max_segments $(cat $q/max_segments))"
    case $line in *"indirect descriptors: enabled"*) ;; *) bad "$d: blkfront says no indirect descriptors" ;; esac
    [ "$(cat $q/write_cache)" = "write back" ] && ok "$d: flush (write back cache)" || bad "$d: no flush (write_cache $(cat $q/write_cache))"
    [ "$(cat $q/discard_max_bytes)" -gt 0 ] && ok "$d: discard" || bad "$d: no discard"
}

# fio_verify DISK [--verify_only]: three crc32c-verified jobs; 4k random, 64k random, 1M sequential
fio_verify() {
    local d=$1 extra=${2:-} j rc
    local io="--filename=/dev/$d --direct=1 --ioengine=libaio --verify=crc32c --verify_fatal=1 --eta=never"
    for j in "r4k --rw=randwrite --bs=4k --offset=0 --size=4M --iodepth=8" \
        "r64k --rw=randwrite --bs=64k --offset=4M --size=8M --iodepth=8" \
        "s1m --rw=write --bs=1M --offset=12M --size=8M --iodepth=4 --end_fsync=1"; do
        # shellcheck disable=SC2086
        fio --name=$j $io $extra --output=/tmp/fio-$d.txt
        rc=$?
        if [ $rc = 0 ] && grep -q 'err= 0' /tmp/fio-$d.txt; then
            ok "$d: fio ${j%% *} crc32c ${extra:+(verify only) }$(grep -m1 -o 'IOPS=[^,]*' /tmp/fio-$d.txt)"
        else
            bad "$d: fio ${j%% *} ${extra} rc=$rc: $(grep -i -m3 -e 'verify' -e 'err' /tmp/fio-$d.txt | tr '\n' ' ')"
        fi
    done
}

# discard_check DISK: a written pattern is discarded; the Dom0 script checks the image
# afterwards (raw: zeros/hole, LV: zeros, qcow2: the clusters no longer hold data)
discard_check() {
    local d=$1
    dd if=/dev/zero bs=1M count=8 2> /dev/null | tr '\0' '\253' | dd of=/dev/$d bs=1M seek=32 oflag=direct conv=fsync 2> /dev/null
    if blkdiscard -o $((32 << 20)) -l $((8 << 20)) /dev/$d; then ok "$d: blkdiscard 8 MiB at 32 MiB"; else bad "$d: blkdiscard"; fi
}

# Detach and re-attach. The guest closes every disk (driver unbind: blkfront goes Closed and
# the backend must follow); then, like a toolstack, the Dom0 script detaches and re-attaches
# the disks (new frontend nodes, new xenbus devices) when it sees "GUEST reattach-please".
rebind_check() {
    local d dev t
    for d in $disks; do
        dd if=/dev/urandom of=/tmp/pat-$d bs=4096 count=64 2> /dev/null
        dd if=/tmp/pat-$d of=/dev/$d bs=4096 seek=12288 count=64 oflag=direct conv=fsync 2> /dev/null # 48 MiB
    done
    for d in $disks; do
        dev=$(basename "$(readlink /sys/block/$d/device)")
        echo "$dev" > /sys/bus/xen/drivers/vbd/unbind && ok "$d: unbind $dev" || bad "$d: unbind $dev"
    done
    for d in $disks; do # the node goes when blkfront's remove has run (bound: 120 s)
        t=0
        while [ -b /dev/$d ] && [ $t -lt 120 ]; do sleep 1; t=$((t + 1)); done
        [ -b /dev/$d ] && bad "$d still present 120s after unbind"
    done
    # No bind of the old devices: one that probes while its backend still says Connected connects
    # again at once (the backend serves it, see DESIGN.md), and the detach below would then close a
    # live disk instead of following a closed one.
    echo "GUEST reattach-please"
    wait_disks 1800 || return
    ok "all disks back after unbind and re-attach"
    for d in $disks; do
        dd if=/dev/$d of=/tmp/back-$d bs=4096 skip=12288 count=64 iflag=direct 2> /dev/null
        cmp -s /tmp/pat-$d /tmp/back-$d && ok "$d: data written before the detach reads back" ||
            bad "$d: data differs after detach and re-attach"
        negotiated "$d"
        fio_verify "$d" --verify_only
    done
}

# restart_io DISK: write+verify passes (crc32c, 64k random writes, $passmib MiB each at one of
# four rotating offsets) until Dom0 says "stop". Each pass is announced ("GUEST restart-pass N started") and
# its verdict printed ("GUEST restart-pass N verified"): Dom0 kills the daemon only once a pass
# has started and its I/O is seen flowing, and says stop only after the passes in flight
# across the kills and one more started after the last restart have verified. So how fast
# this guest runs changes how many passes there are, not what is checked.
restart_io() {
    local d=$1 n=0 good=0 rc
    echo "GUEST restart-io-start"
    while ! dom0_said stop; do
        if [ $n -ge "$maxpasses" ]; then bad "$d: Dom0 did not say stop within $maxpasses passes"; break; fi
        n=$((n + 1))
        echo "GUEST restart-pass $n started"
        fio --name=restart$n --filename=/dev/$d --direct=1 --ioengine=libaio --rw=randwrite --bs=64k \
            --iodepth=8 --offset=$(((n % regions) * 16))M --size=${passmib}M --verify=crc32c --do_verify=1 \
            --verify_fatal=1 --eta=never --output=/tmp/fio-restart.txt
        rc=$?
        if [ $rc != 0 ] || ! grep -q 'err= 0' /tmp/fio-restart.txt; then
            bad "$d: fio pass $n rc=$rc: $(grep -i -m3 -e verify -e err /tmp/fio-restart.txt | tr '\n' ' ')"
            break
        fi
        echo "GUEST restart-pass $n verified"
        good=$((good + 1))
    done
    echo "GUEST restart-io-done passes=$good"
    [ $good -gt 0 ] && ok "$d: $good fio write+verify passes (crc32c) across the daemon restarts"
    # every verified pass's data once more, now that the kills are over (the same job replays the
    # same blocks; a later pass over the same region has its own data, so only the last per region)
    local k first=$((good > regions ? good - regions + 1 : 1)) again=0
    for k in $(seq $first $good); do
        fio --name=restart$k --filename=/dev/$d --direct=1 --ioengine=libaio --rw=randwrite --bs=64k \
            --iodepth=8 --offset=$(((k % regions) * 16))M --size=${passmib}M --verify=crc32c --verify_only=1 \
            --verify_fatal=1 --eta=never --output=/tmp/fio-reverify.txt && grep -q 'err= 0' /tmp/fio-reverify.txt &&
            again=$((again + 1)) ||
            bad "$d: pass $k's data no longer verifies: $(grep -i -m3 -e verify -e err /tmp/fio-reverify.txt | tr '\n' ' ')"
    done
    [ $good -gt 0 ] && [ $again = $((good - first + 1)) ] && ok "$d: the data of passes $first..$good verifies again after the restarts"
    if dmesg | grep -i "dev $d\|blkfront.*$d\|$d.*error" | grep -qi error; then
        bad "$d: I/O errors in dmesg: $(dmesg | grep -i "$d" | grep -i -m3 error | tr '\n' ' ')"
    else
        ok "$d: no I/O error in dmesg"
    fi
}

# dm_error_check DISK: Dom0 backs DISK with dm-linear (first half) + dm-error (second half)
dm_error_check() {
    local d=$1 half
    half=$(($(cat /sys/block/$d/size) / 2 / 2048)) # MiB
    dd if=/dev/$d of=/dev/null bs=1M count=$half iflag=direct 2> /dev/null && ok "$d: the good half ($half MiB) reads" ||
        bad "$d: the good half does not read"
    if dd if=/dev/$d of=/dev/null bs=1M skip=$half count=1 iflag=direct 2> /dev/null; then
        bad "$d: the dm-error half read without an error"
    else
        ok "$d: the dm-error half fails the read (dd exit status non-zero)"
    fi
    dd if=/dev/$d of=/dev/null bs=1M count=1 iflag=direct 2> /dev/null && ok "$d: still reads after the error" ||
        bad "$d: unusable after the error"
}

bench() {
    local j d
    for j in "randread4k-qd1 --rw=randread --bs=4k --iodepth=1" \
        "randread4k-qd32 --rw=randread --bs=4k --iodepth=32" \
        "randwrite4k-qd1 --rw=randwrite --bs=4k --iodepth=1" \
        "randwrite4k-qd32 --rw=randwrite --bs=4k --iodepth=32" \
        "seqread1m --rw=read --bs=1M --iodepth=4" \
        "seqwrite1m --rw=write --bs=1M --iodepth=4"; do
        for d in $disks; do # interleaved, so drift of the emulated machine hits all backends alike
            # shellcheck disable=SC2086
            if fio --name=$j --filename=/dev/$d --direct=1 --ioengine=libaio --time_based --runtime="$runtime" \
                --ramp_time=1 --size=96M --eta=never --output-format=json --output=/tmp/b.json; then
                echo "GUEST-JSON $d ${j%% *} $(tr -d '\n' < /tmp/b.json)"
            else
                bad "$d: fio ${j%% *}"
            fi
        done
    done
}

# hot_disks: for each "xbctl hotN" from Dom0 (N = 1, 2, ...: Dom0 `xl block-attach`ed a disk as
# xvdc), a verified fio run on xvdc, "GUEST hotN verified", then "GUEST hotN gone" once Dom0's
# `xl block-detach` removed it. Runs beside restart_io until Dom0 says stop; its failures are
# GUEST FAIL lines, which Dom0 counts.
hot_disks() {
    local n=1 t
    while ! dom0_said stop; do
        if dom0_said "hot$n"; then
            disks=xvdc wait_disks 1800 && fio_verify xvdc
            echo "GUEST hot$n verified"
            t=0
            while [ -b /dev/xvdc ] && [ $t -lt 1800 ]; do sleep 1; t=$((t + 1)); done
            [ -b /dev/xvdc ] && bad "xvdc still present 1800s after hot$n" || echo "GUEST hot$n gone"
            n=$((n + 1))
        fi
        sleep 1
    done
}

wait_disks 1800 || { echo "GUEST failures=$fail"; exit $fail; }
if [ "$mode" = xl ]; then
    # `xl shutdown` makes the kernel run /sbin/poweroff (orderly_poweroff), which busybox lacks there
    mkdir -p /sbin && printf '#!/bin/sh\nsync\nexec /bin/busybox poweroff -f\n' > /sbin/poweroff && chmod 755 /sbin/poweroff
    hot_disks &
    restart_io xvdb
    wait
    echo "GUEST failures=$fail"
    echo "GUEST waiting for xl shutdown"
    while :; do sleep 60; done
elif [ "$mode" = bench ]; then
    bench
elif [ "$mode" = restart ]; then
    restart_io xvdb
    case " $disks " in *" xvdd "*)
        dm_error_check xvdd
        echo "GUEST dm-error-checked"
        # the disks stay connected until Dom0 has read the daemon's error counters
        dom0_wait release 1800 || bad "Dom0 did not say release (bound 1800s)" ;;
    esac
else
    for d in $disks; do
        negotiated "$d"
        fio_verify "$d"
        discard_check "$d"
    done
    rebind_check
fi
sync
echo "GUEST failures=$fail"
exit $fail
