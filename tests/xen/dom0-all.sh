#!/bin/bash
# Dom0 side of `make xen-test-<flavour>`: the test boot's script (dom0-test.sh) and then the
# restart boot's (dom0-restart.sh) in one Dom0, each with its own log dir under XEN_TEST_OUT
# (test/, restart/). One boot instead of two: a Debian 13 Dom0 under systemd takes minutes to
# come up under TCG, and each script leaves the Dom0 as it found it (its guest gone, its daemon
# stopped, its devices detached), which the second one's own checks would catch otherwise.
# Env: as dom0-test.sh and dom0-restart.sh. Exit status: the sum of their failures (at most 100).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${XEN_TEST_OUT:?}
rc=0 results=()
# dom0-xl.sh (the xl lifecycle) is not in this list yet: its later steps have not passed in a real
# boot (run.sh FLAVOUR xl, make xen-xl)
for what in test restart; do
    mkdir -p "$OUT/$what"
    echo "==== $what (dom0-$what.sh; logs in $OUT/$what)"
    # into a file, followed until the script exits: a daemon the script starts in passing
    # (dmeventd for a thin pool) keeps its stdout open, so a pipe to tee would wait for it
    # forever, and the d12 Dom0 has no /dev/fd for a process substitution
    XEN_TEST_OUT=$OUT/$what "$ROOT/tests/xen/dom0-$what.sh" > "$OUT/$what/run.log" 2>&1 &
    pid=$!
    tail -n +1 -f --pid=$pid "$OUT/$what/run.log"
    wait $pid
    r=$?
    results+=("$what: exit status $r")
    rc=$((rc + r))
done
echo "==== xen-test on ${XEN_TEST_FLAVOUR:-?}: ${results[*]}"
exit $((rc > 100 ? 100 : rc))
