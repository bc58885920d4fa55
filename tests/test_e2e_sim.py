"""The product end to end on the simulated host, through the CLI only: attach a
qcow2 over a backing file and a raw image to a simulated guest, run a verified
workload through the real rings, scrape the metrics with promtool and a real
Prometheus server, and check the qcow2 with qemu-img afterwards."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.e2e import Stack, free_port, run_stack, stop
from tests.fixtures.wait import GENEROUS, proc_alive, wait_until


def make_images(stack: Stack) -> tuple[Path, Path]:
    base, qcow, raw = stack.base / "base.raw", stack.images / "disk.qcow2", stack.images / "data.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(base), "64M"], check=True)
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 8M", str(base)], check=True, capture_output=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(qcow)], check=True)
    subprocess.run(["truncate", "-s", "64M", str(raw)], check=True)
    return qcow, raw


def disks_of(result: Any) -> list[dict[str, Any]]:
    disks = result.get("disks", result) if isinstance(result, dict) else result
    return list(disks.values()) if isinstance(disks, dict) else list(disks)


def test_verified_workload_on_qcow2_and_raw(stack: Stack) -> None:
    qcow, raw = make_images(stack)
    stack.attach(1, f"qcow2:{qcow}", "xvdb")
    stack.attach(1, str(raw), "xvdc")
    rc, result = stack.guest(1, "--rw", "randrw", "--bs", "4k", "--iodepth", "16", "--size", "16M", "--verify",
                             "--seed", "3", "--queues", "2", "--ring-order", "2", "--indirect")  # fmt: skip
    assert rc == 0, f"{result}\n{stack.log_tail()}"
    disks = disks_of(result)
    assert len(disks) == 2
    for d in disks:
        assert d.get("errors", 0) == 0 and d.get("verify_errors", 0) == 0, d
    listing = json.loads(stack.xenblk("list", "--json", "--sim", str(stack.sim)).stdout)
    assert {row["vdev"] for row in listing} >= {"xvdb", "xvdc"}
    assert stop(stack.serve) == 0, stack.log_tail()
    chk = subprocess.run(["qemu-img", "check", str(qcow)], capture_output=True, text=True)
    assert chk.returncode == 0, chk.stdout + chk.stderr


def _prom_query(base: str, q: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": q})
    data = json.loads(urllib.request.urlopen(url, timeout=30).read())
    assert data["status"] == "success", data
    return list(data["data"]["result"])


def test_live_scrape_passes_promtool_and_prometheus_sees_the_workload(stack: Stack, tmp_path: Path) -> None:
    for tool in ("promtool", "prometheus"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} missing: `make test` installs Debian's prometheus package")
    raw = stack.images / "p.raw"
    subprocess.run(["truncate", "-s", "64M", str(raw)], check=True)
    stack.attach(2, str(raw), "xvdb")
    port = free_port()
    target = stack.metrics_url.split("//")[1].split("/")[0]
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: xenblk\n    static_configs:\n      - targets: ['{target}']\n"
    )
    prom = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"),  # noqa: SIM115
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    guest = stack.guest_proc(2, "--rw", "randread", "--bs", "4k", "--iodepth", "8", "--until-stopped")
    try:
        # The guest's reads flowing through the daemon (its counter), not a pause that is hopefully long enough.
        stack.wait_backend(2, "xvdb", 4)
        stack.wait_served(100, 2, "xvdb")
        live = stack.scrape()
        check = subprocess.run(["promtool", "check", "metrics"], input=live, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr

        def stats_row() -> dict[str, Any]:
            rows = json.loads(stack.xenblk("stats", "--json", "--interval", "0.5").stdout)
            row: dict[str, Any] = next(r for r in rows if (r["domid"], r["vdev"]) == ("2", "xvdb"))
            assert row["state"] == 4 and row["p99_us"] is not None and row["errors"] == 0, row
            return row

        # a rate over 0.5 s: asked again if a loaded machine let no request finish in that window
        wait_until(lambda: stats_row()["iops"] > 0, "xenblk stats shows IOPS for dom2/xvdb", interval=0.1)
        rate: list[dict[str, Any]] = []
        p99: list[dict[str, Any]] = []

        def prometheus_sees_the_workload() -> bool:
            nonlocal rate, p99
            rate = [r for r in _prom_query(base, 'sum(rate(xenblk_requests_total{domid="2",vdev="xvdb"}[5s]))')
                    if float(r["value"][1]) > 0]  # fmt: skip
            p99 = [r for r in _prom_query(base, 'histogram_quantile(0.99, sum by (le) '
                   '(rate(xenblk_request_duration_seconds_bucket{domid="2",vdev="xvdb"}[5s])))')
                   if r["value"][1] not in ("NaN", "+Inf")]  # fmt: skip
            return bool(rate and p99)

        # The guest runs until Prometheus has scraped it twice under load (however long that takes).
        wait_until(prometheus_sees_the_workload, "Prometheus sees a request rate and a p99 for dom2/xvdb",
                   interval=0.5, alive=proc_alive(guest, "the guest"))  # fmt: skip
        assert p99 and 0 < float(p99[0]["value"][1]) < 10, p99
        guest.send_signal(signal.SIGTERM)  # stop issuing, drain, report
        out, err = guest.communicate(timeout=GENEROUS)
        assert guest.returncode == 0, out + err
        # the counters match what the guest issued, once Prometheus has scraped the final values
        issued = sum(int(d.get("ios", d.get("requests", 0))) for d in disks_of(json.loads(out)))
        assert issued > 0
        served: list[float] = [0.0]

        def all_counted() -> bool:
            total = _prom_query(base, 'sum(xenblk_requests_total{domid="2",vdev="xvdb"})')
            served[0] = float(total[0]["value"][1]) if total else 0.0
            return served[0] >= issued

        wait_until(all_counted, f"Prometheus counts the {issued} requests the guest issued", interval=0.5,
                   detail=lambda: f"served {served[0]}")  # fmt: skip
    finally:
        if guest.poll() is None:
            guest.kill()
            guest.communicate()
        stop(prom)


def _read(stack: Stack, domid: int, vdev: str, key: str) -> str:
    from xenblk.xen.vdev import vdev_to_devid

    return stack.xenstore("read", f"/local/domain/0/backend/vbd3/{domid}/{vdev_to_devid(vdev)}/{key}")


def test_two_guests_several_disks_reconnect_and_detach(stack: Stack) -> None:
    for domid in (1, 2):
        for vdev in ("xvdb", "xvdc"):
            img = stack.images / f"d{domid}{vdev}.raw"
            subprocess.run(["truncate", "-s", "32M", str(img)], check=True)
            stack.attach(domid, str(img), vdev, "--wait=initwait")
    args = ("--rw", "randrw", "--bs", "4k", "--iodepth", "8", "--size", "4M", "--verify", "--queues", "2")
    guests = {domid: stack.guest_proc(domid, *args) for domid in (1, 2)}
    for domid, g in guests.items():
        out, err = g.communicate(timeout=300)
        assert g.returncode == 0, f"dom{domid}: {out}{err}\n{stack.log_tail()}"
        disks = disks_of(json.loads(out))
        assert len(disks) == 2 and all(d["verify_errors"] == 0 and d["ios"] > 0 for d in disks), disks
    # the guest closed its disks; run it again: Closed -> Initialising reconnects
    rc, result = stack.guest(1, *args)
    assert rc == 0, f"{result}\n{stack.log_tail()}"
    assert 'xenblk_device_reconnects_total{domid="1",vdev="xvdb"} 1.0' in stack.scrape()
    stack.xenblk("detach", "1", "xvdb", "--sim", str(stack.sim))
    listing = json.loads(stack.xenblk("list", "--json", "--sim", str(stack.sim)).stdout)
    assert sorted((r["domid"], r["vdev"]) for r in listing) == [(1, "xvdc"), (2, "xvdb"), (2, "xvdc")]


def test_online_resize_through_the_cli(stack: Stack) -> None:
    img = stack.images / "grow.raw"
    subprocess.run(["truncate", "-s", "16M", str(img)], check=True)
    stack.attach(3, str(img), "xvdb")
    guest = stack.guest_proc(3, "--idle", "--until-stopped")
    try:
        stack.wait_backend(3, "xvdb", 4)
        assert _read(stack, 3, "xvdb", "sectors") == str(16 << 11)
        os.truncate(img, 48 << 20)
        r = stack.xenblk("resize", "3", "xvdb", "--sim", str(stack.sim))
        assert f"{16 << 11} -> {48 << 11} sectors" in r.stdout
        assert _read(stack, 3, "xvdb", "sectors") == str(48 << 11)
        assert _read(stack, 3, "xvdb", "state") == "4"
        assert 'xenblk_device_resizes_total{domid="3",vdev="xvdb"} 1.0' in stack.scrape()
    finally:
        guest.terminate()
        guest.communicate(timeout=60)


def test_ring_ref_not_granted_closes_only_that_device(stack: Stack) -> None:
    """A hand-written hostile frontend on the real platform: its ring-ref names a grant it never made."""
    from xenblk.sim.broker import BrokerClient, read_host_json
    from xenblk.xen.vdev import vdev_to_devid

    good, bad = stack.images / "good.raw", stack.images / "bad.raw"
    for p in (good, bad):
        subprocess.run(["truncate", "-s", "16M", str(p)], check=True)
    stack.attach(5, str(good), "xvdb")
    guest = stack.guest_proc(5, "--rw", "randread", "--iodepth", "4", "--until-stopped")
    try:
        stack.wait_backend(5, "xvdb", 4)
        stack.wait_served(0, 5, "xvdb")
        stack.attach(6, str(bad), "xvdb", "--wait=initwait")
        with BrokerClient(read_host_json(stack.sim)["broker"]) as broker:
            reply, fds = broker.call({"op": "evtchn_alloc_unbound", "domid": 6, "remote_domid": 0})
            for fd in fds:
                os.close(fd)
            f = f"/local/domain/6/device/vbd/{vdev_to_devid('xvdb')}"
            stack.xenstore("write", f"{f}/ring-ref", "77", f"{f}/event-channel", str(reply["port"]),
                           f"{f}/state", "3")  # fmt: skip
        stack.wait_backend(6, "xvdb", 6)
        error = _read(stack, 6, "xvdb", "error")
        assert "cannot connect the rings" in error and "77" in error, error
        # the good guest is still served after its neighbour was refused: more of its requests answered
        stack.wait_served(stack.served(5, "xvdb") + 50, 5, "xvdb")
        guest.send_signal(signal.SIGTERM)
        out, err = guest.communicate(timeout=GENEROUS)
    finally:
        if guest.poll() is None:
            guest.kill()
            guest.communicate()
    assert guest.returncode == 0, out + err
    assert all(d["errors"] == 0 and d["ios"] > 0 for d in disks_of(json.loads(out)))
    assert stack.serve.poll() is None


def test_sigterm_under_load_hands_the_devices_over_to_the_next_daemon(stack: Stack) -> None:
    """daemon.on_stop = "keep" (the default): `systemctl restart xenblk` under a verified workload is
    invisible to the guest: drained, nothing written to XenStore, the next daemon resumes the rings."""
    qcow, _raw = make_images(stack)
    stack.attach(1, f"qcow2:{qcow}", "xvdb")
    guest = stack.guest_proc(1, "--rw", "randrw", "--bs", "8k", "--iodepth", "16", "--verify", "--flush-every", "32",
                             "--seed", "4", "--until-stopped")  # fmt: skip
    try:
        stack.wait_backend(1, "xvdb", 4)
        stack.wait_served(200, 1, "xvdb")  # under load: the guest's writes are being answered
        assert stop(stack.serve) == 0, stack.log_tail()
        assert _read(stack, 1, "xvdb", "state") == "4"  # the guest was told nothing
        with pytest.raises(AssertionError):
            _read(stack, 1, "xvdb", "error")
        assert '"device.handed_over"' in stack.serve_log.read_text()
        state = stack.config.parent / "state"
        assert list(state.glob("*.journal")), "the rings' journals were not kept"
        orphan = state / "vbd3-9-51712-q0.journal"  # a guest destroyed while no daemon ran
        orphan.write_bytes(b"x" * 4096)
        stack.restart_serve()
        stack.wait_served(200, 1, "xvdb")  # the new daemon serves the same rings
        assert not orphan.exists()
        assert guest.poll() is None, "the guest's workload ended across the restart"
        guest.send_signal(signal.SIGTERM)
        out, err = guest.communicate(timeout=GENEROUS)
    finally:
        if guest.poll() is None:
            guest.kill()
            guest.communicate(timeout=60)
    assert guest.returncode == 0, f"{out}\n{err}\n{stack.log_tail()}"
    (d,) = disks_of(json.loads(out))
    assert d.get("errors", 0) == 0 and d.get("verify_errors", 0) == 0 and d["verified_reads"] > 0, d
    log = stack.serve_log.read_text()
    assert log.count('"device.resumed"') == 1 and '"device.stale_connection"' not in log, stack.log_tail(80)
    assert stop(stack.serve) == 0, stack.log_tail()
    chk = subprocess.run(["qemu-img", "check", str(qcow)], capture_output=True, text=True)
    assert chk.returncode == 0, chk.stdout + chk.stderr


def test_sigterm_with_on_stop_close_drains_and_closes_cleanly(tmp_path: Path, sim_dir: Path) -> None:
    with run_stack(tmp_path, sim_dir, daemon_config='on_stop = "close"') as stack:
        qcow, _raw = make_images(stack)
        stack.attach(1, f"qcow2:{qcow}", "xvdb")
        guest = stack.guest_proc(1, "--rw", "randwrite", "--iodepth", "32", "--until-stopped", "--io-timeout", "20")
        try:
            stack.wait_backend(1, "xvdb", 4)
            stack.wait_served(200, 1, "xvdb")
            assert stop(stack.serve) == 0, stack.log_tail()
            assert _read(stack, 1, "xvdb", "state") == "6"
            with pytest.raises(AssertionError):
                _read(stack, 1, "xvdb", "error")  # closed cleanly, not on an error
            assert '"device.stopped"' in stack.serve_log.read_text()
            assert not list((tmp_path / "state").glob("*.journal"))  # nothing left to resume
        finally:
            guest.kill()
            guest.communicate(timeout=60)
    chk = subprocess.run(["qemu-img", "check", str(qcow)], capture_output=True, text=True)
    assert chk.returncode == 0, chk.stdout + chk.stderr
