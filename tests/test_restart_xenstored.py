"""xenstored unresponsive under load (SIGSTOP for a few seconds, then SIGCONT): the rings do not
depend on XenStore, so the guest's verified workload keeps being served during the outage, and
the daemon is still serving and answering afterwards."""

from __future__ import annotations

import json
import os
import signal

from tests.fixtures.e2e import Stack
from tests.fixtures.wait import GENEROUS
from tests.test_e2e_sim import disks_of


def test_guest_io_flows_while_xenstored_is_frozen(stack: Stack) -> None:
    raw = stack.images / "x.raw"
    raw.write_bytes(b"")
    os.truncate(raw, 64 << 20)
    stack.attach(1, str(raw), "xvdb")
    guest = stack.guest_proc(1, "--rw", "randrw", "--bs", "4k", "--iodepth", "8", "--queues", "2", "--verify",
                             "--until-stopped")  # fmt: skip
    xenstored_pid = int(json.loads((stack.sim / "host.json").read_text())["xenstored_pid"])
    try:
        stack.wait_backend(1, "xvdb", 4)
        before = stack.wait_served(100)
        os.kill(xenstored_pid, signal.SIGSTOP)
        try:
            # The metrics endpoint reads the data plane's counters, not XenStore: they must keep rising.
            stack.wait_served(before + 1000)
        finally:
            os.kill(xenstored_pid, signal.SIGCONT)
        after = stack.served()
        assert guest.poll() is None, "the guest run ended during the outage"
        assert stack.serve.poll() is None, stack.log_tail()
        stack.xenblk("list", "--sim", str(stack.sim))  # the control plane answers again once xenstored does
        guest.send_signal(signal.SIGTERM)
        out, err = guest.communicate(timeout=GENEROUS)
    finally:
        if guest.poll() is None:
            guest.kill()
            guest.wait()
    assert guest.returncode == 0, f"{out}\n{err}\n{stack.log_tail()}"
    for d in disks_of(json.loads(out)):
        assert d.get("errors", 0) == 0 and d.get("verify_errors", 0) == 0, d
    assert after > before
