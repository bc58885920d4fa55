"""Image files changed under `xenblk serve` on the simulated host, through the CLI only: one
guest's image is unlinked and its verified workload carries on without an error; another
guest's image is truncated and that guest gets I/O errors (counted in the metrics as io errors)
while the daemon and the first guest keep going. Nothing here uses the fault-injection layer:
the files are changed for real."""

from __future__ import annotations

import json
import os
import signal
import subprocess

from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.e2e import Stack
from tests.fixtures.wait import GENEROUS, wait_until
from tests.test_e2e_sim import disks_of


def _errors_by_reason(stack: Stack, domid: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(stack.scrape()):
        for s in fam.samples:
            if s.name == "xenblk_errors_total" and s.labels.get("domid") == str(domid):
                out[s.labels["reason"]] = out.get(s.labels["reason"], 0) + s.value
    return out


def test_unlinked_and_truncated_images_under_the_daemon(stack: Stack) -> None:
    kept, doomed = stack.images / "kept.raw", stack.images / "doomed.raw"
    for p in (kept, doomed):
        subprocess.run(["truncate", "-s", "16M", str(p)], check=True)
    stack.attach(7, str(kept), "xvdb")
    stack.attach(8, str(doomed), "xvdb")
    verified = stack.guest_proc(7, "--rw", "randrw", "--bs", "16k", "--iodepth", "8", "--until-stopped", "--verify",
                                "--flush-every", "16", "--io-timeout", "30")  # fmt: skip
    reader = stack.guest_proc(8, "--rw", "randread", "--bs", "16k", "--iodepth", "4", "--until-stopped",
                              "--io-timeout", "30")  # fmt: skip
    try:
        stack.wait_backend(7, "xvdb", 4)
        stack.wait_backend(8, "xvdb", 4)
        # both workloads under way (their requests answered), so the changes land mid-run
        stack.wait_served(100, 7, "xvdb")
        stack.wait_served(100, 8, "xvdb")
        kept.unlink()
        os.truncate(doomed, 1 << 20)
        # the reader meets the truncation (an io error counted), the verified guest carries on past both changes
        wait_until(lambda: _errors_by_reason(stack, 8).get("io", 0) > 0, "an io error of dom8 counted",
                   detail=stack.log_tail)  # fmt: skip
        stack.wait_served(stack.served(7, "xvdb") + 200, 7, "xvdb")
        for g in (verified, reader):
            if g.poll() is None:  # the reader may have stopped on its error already
                g.send_signal(signal.SIGTERM)
        out, err = verified.communicate(timeout=GENEROUS)
        assert verified.returncode == 0, out + err + stack.log_tail()
        assert all(
            d["errors"] == 0 and d.get("verify_errors", 0) == 0 and d["ios"] > 0 for d in disks_of(json.loads(out))
        )
        out, err = reader.communicate(timeout=GENEROUS)
    finally:
        for g in (verified, reader):
            if g.poll() is None:
                g.kill()
                g.communicate()
    assert reader.returncode != 0, out
    assert sum(d["errors"] for d in disks_of(json.loads(out))) > 0, out
    assert stack.serve.poll() is None, stack.log_tail()
    errors = _errors_by_reason(stack, 8)
    assert errors.get("io", 0) > 0 and errors.get("nospc", 0) == 0, errors
    assert sum(_errors_by_reason(stack, 7).values()) == 0
