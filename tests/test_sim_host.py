"""`xenblk sim host` as a process: ready signal, what it serves, clean shutdown, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.fixtures.sim import XENBLK, SimHostProc, start_sim_host
from tests.fixtures.wait import GENEROUS
from xenblk.sim.broker import BrokerClient, ensure_domain
from xenblk.sim.host import _alive
from xenblk.xen.vdev import VdevError, devid_to_vdev, vdev_to_devid


def xs_read(host: SimHostProc, path: str) -> str:
    return subprocess.run(["xenstore-read", path], env=host.env(), capture_output=True, text=True, check=True).stdout


def test_host_serves_xenstored_and_broker_then_cleans_up(sim_host: SimHostProc) -> None:
    info = json.loads((sim_host.dir / "host.json").read_text())
    assert info["xenstored_path"] == str(sim_host.dir / "xenstored" / "socket")
    assert info["broker"] == str(sim_host.dir / "broker.sock")
    assert info["pid"] == sim_host.proc.pid
    assert sim_host.stdout_line == f"XENSTORED_PATH={info['xenstored_path']}"
    assert xs_read(sim_host, "/local/domain/0/name").strip() == "Domain-0"
    ensure_domain(sim_host.dir, 4, name="vm4")
    ensure_domain(sim_host.dir, 4)  # idempotent, as attach calls it for every disk
    assert xs_read(sim_host, "/local/domain/4/name").strip() == "vm4"
    with BrokerClient(info["broker"]) as c:
        reply, fds = c.call({"op": "map_domain", "domid": 4})
        for fd in fds:
            os.close(fd)
    assert reply["ok"]
    assert sim_host.stop() == 0
    assert sorted(p.name for p in sim_host.dir.iterdir()) == ["host.log", "xenstored"]
    assert not (sim_host.dir / "xenstored" / "socket").exists()


def test_sigint_stops_it_too(sim_dir: Path) -> None:
    host = start_sim_host(sim_dir)
    host.proc.send_signal(signal.SIGINT)
    assert host.proc.wait(timeout=GENEROUS) == 0
    assert not (sim_dir / "host.json").exists() and not (sim_dir / "broker.sock").exists()


def test_second_host_on_the_same_dir_is_refused(sim_host: SimHostProc) -> None:
    r = subprocess.run([*XENBLK, "sim", "host", "--dir", str(sim_host.dir)], capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert r.returncode == 1
    assert "already runs" in r.stderr
    assert sim_host.proc.poll() is None
    assert xs_read(sim_host, "/local/domain/0/domid").strip() == "0"


def test_a_stale_dir_from_a_killed_host_is_reused(sim_dir: Path) -> None:
    host = start_sim_host(sim_dir)
    old_xenstored = json.loads((sim_dir / "host.json").read_text())["xenstored_pid"]
    host.proc.kill()
    host.proc.wait()
    again = start_sim_host(sim_dir)
    try:
        assert xs_read(again, "/local/domain/0/name").strip() == "Domain-0"
        new_xenstored = json.loads((sim_dir / "host.json").read_text())["xenstored_pid"]
        assert new_xenstored != old_xenstored
        assert not _alive(old_xenstored)
    finally:
        assert again.stop() == 0


def test_a_dir_too_deep_for_sockets_still_works(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 100) / "sim"
    host = start_sim_host(deep)
    try:
        info = json.loads((deep / "host.json").read_text())
        assert len(info["xenstored_path"]) < 108 and len(info["broker"]) < 108
        assert (deep / "xenstored").resolve() == Path(info["xenstored_path"]).parent
        assert xs_read(host, "/local/domain/0/name").strip() == "Domain-0"
        ensure_domain(deep, 3)
        assert xs_read(host, "/local/domain/3/domid").strip() == "3"
    finally:
        assert host.stop() == 0
    assert not Path(info["broker"]).parent.exists(), "the short socket directory is removed"
    assert not (deep / "xenstored").exists() and not (deep / "host.json").exists()


def test_ensure_domain_without_a_host_says_how_to_start_one(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="xenblk sim host --dir"):
        ensure_domain(tmp_path, 1)


@pytest.mark.parametrize(
    ("vdev", "devid"),
    [("xvda", 51712), ("xvdb", 51728), ("xvdp", 51952), ("xvdq", (1 << 28) | (16 << 8)),
     ("xvdz", (1 << 28) | (25 << 8)), ("xvdaa", (1 << 28) | (26 << 8)), ("xvdzz", (1 << 28) | (701 << 8))],
)  # fmt: skip
def test_vdev_devid_round_trip(vdev: str, devid: int) -> None:
    assert vdev_to_devid(vdev) == devid
    assert devid_to_vdev(devid) == vdev


@pytest.mark.parametrize("vdev", ["xvdb1", "sda", "hda", "xvd", "xvdB", "xvd-b", ""])
def test_vdev_refuses_partitions_and_other_names(vdev: str) -> None:
    with pytest.raises(VdevError):
        vdev_to_devid(vdev)


@pytest.mark.parametrize("devid", [51729, 51713, 8 << 8, (1 << 28) | (3 << 8), (1 << 28) | (20 << 8) | 1, -1, 1 << 29])
def test_devid_refuses_partitions_and_other_majors(devid: int) -> None:
    with pytest.raises(VdevError):
        devid_to_vdev(devid)
