"""The NBD export of a disk `xenblk serve` serves to a simulated guest: libnbd's and QEMU's tools as the
oracles, data coherent between the ring and NBD both ways, hostile clients beside a verified guest."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.e2e import Stack
from tests.fixtures.nbd import CMD_READ, CMD_WRITE, EINVAL, EPERM, REQ_MAGIC, Closed, RawNbd
from tests.fixtures.wait import wait_until
from xenblk import _simguest  # type: ignore[attr-defined]

SIZE = 8 << 20
B = "/local/domain/0/backend/vbd3/1"


def unlocked(qcow: Path) -> str:
    """The qcow2 as QEMU opens it without its own byte locks: the daemon holds the image's OFD lock
    while it serves it (README, "Image ownership"), which QEMU's locks conflict with even under -U."""
    return "json:" + json.dumps(
        {"driver": "qcow2", "file": {"driver": "file", "filename": str(qcow), "locking": "off"}}
    )


@pytest.fixture
def tmp_path(short_dir: Path) -> Iterator[Path]:
    """The stack's run_dir below a short directory, so the NBD socket path fits a unix socket."""
    yield short_dir


def pattern(seed: int, size: int = SIZE) -> bytes:
    """What `xenblk sim guest --rw write --seed SEED` writes (generation 1) over a disk of `size`."""
    buf = _simguest.ffi.new("uint8_t[]", size)
    _simguest.lib.xb_sg_pattern_fill(buf, 0, size, seed, 1)
    return bytes(_simguest.ffi.buffer(buf))


def nbd_stats(stack: Stack, vdev: str = "xvdb") -> dict[str, Any]:
    rows = json.loads(stack.xenblk("list", "--json", "--sim", str(stack.sim)).stdout)
    stats: dict[str, Any] = next(r["nbd"] for r in rows if r["domid"] == 1 and r["vdev"] == vdev)
    return stats


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if check and r.returncode:
        raise AssertionError(f"{' '.join(cmd)} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def test_export_through_the_daemon(stack: Stack, tmp_path: Path) -> None:
    qcow = stack.images / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(qcow), str(SIZE))
    ro = stack.images / "ro.raw"
    ro_data = pattern(5, 4 << 20)
    ro.write_bytes(ro_data)
    stack.attach(1, f"qcow2:{qcow}", "xvdb", "--wait=initwait")
    stack.attach(1, str(ro), "xvdc", "--mode", "r", "--wait=initwait")
    sock = stack.xenstore("read", f"{B}/51728/physical-device-path")
    ro_sock = stack.xenstore("read", f"{B}/51744/physical-device-path")
    assert sock == f"{tmp_path}/run/nbd/vbd3-1-51728.sock"
    st = os.lstat(sock)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    assert stat.S_IMODE(os.stat(os.path.dirname(sock)).st_mode) == 0o700
    uri, ro_uri = f"nbd+unix:///?socket={sock}", f"nbd+unix:///?socket={ro_sock}"

    info = json.loads(run("nbdinfo", "--json", uri).stdout)["exports"][0]
    assert info["export-size"] == SIZE
    assert not info["is_read_only"] and info["can_flush"] and info["can_fua"] and info["can_trim"]
    assert info["can_zero"] and info["can_multi_conn"]
    ro_info = json.loads(run("nbdinfo", "--json", ro_uri).stdout)["exports"][0]
    assert ro_info["export-size"] == 4 << 20 and ro_info["is_read_only"]

    # ring -> NBD: what the guest wrote through its ring (allocating qcow2 clusters) is what NBD reads
    rc, res = stack.guest(1, "--vdev", "xvdb", "--rw", "write", "--bs", "64k", "--iodepth", "8", "--seed", "7",
                          "--verify", "--flush-every", "32")  # fmt: skip
    assert rc == 0, f"{res}\n{stack.log_tail()}"
    out = tmp_path / "out.raw"
    run("nbdcopy", uri, str(out))
    assert out.read_bytes() == pattern(7)
    run("qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", uri, unlocked(qcow))

    # NBD -> ring: qemu-io writes another pattern through NBD; the guest reads and verifies it through its ring
    p9 = tmp_path / "p9.raw"
    p9.write_bytes(pattern(9))
    run("qemu-io", "-f", "raw", "-c", f"write -s {p9} 0 {SIZE}", "-c", "flush", uri)
    rc, res = stack.guest(1, "--vdev", "xvdb", "--rw", "read", "--bs", "64k", "--seed", "9", "--verify")
    assert rc == 0 and res["disks"][0]["verified_reads"] > 0, f"{res}\n{stack.log_tail()}"  # type: ignore[index]

    # WRITE_ZEROES, TRIM, FUA write and FLUSH, checked through NBD, then the file against the export
    run("qemu-io", "-f", "raw", "-c", "write -z 1M 1M", "-c", "discard 2M 1M", "-c", "write -f -P 0x5a 3M 64k",
        "-c", "flush", "-c", "read -P 0 1M 2M", "-c", "read -P 0x5a 3M 64k", uri)  # fmt: skip
    want = bytearray(pattern(9))
    want[1 << 20 : 3 << 20] = bytes(2 << 20)
    want[3 << 20 : (3 << 20) + 65536] = b"\x5a" * 65536
    run("nbdcopy", uri, str(out))
    assert out.read_bytes() == want
    run("qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", uri, unlocked(qcow))
    assert run("qemu-img", "check", "-U", unlocked(qcow), check=False).returncode in (0, 3)  # 3: leaks only

    # the read-only disk: readable, every write refused with EPERM, its file untouched
    run("nbdcopy", ro_uri, str(out))
    assert out.read_bytes() == ro_data
    r = run("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", ro_uri, check=False)
    assert r.returncode and "Permission denied" in r.stderr, r  # QEMU sees NBD_FLAG_READ_ONLY and will not write
    c = RawNbd(ro_sock).connect()  # a client that writes anyway
    c.request(CMD_WRITE, 0, 4096, cookie=5, payload=b"\1" * 4096)
    assert c.reply()[:2] == (EPERM, 5)
    c.close()
    assert ro.read_bytes() == ro_data

    nbd = nbd_stats(stack)
    assert nbd["socket"] == sock and nbd["written_bytes"] >= SIZE and nbd["errors"] == 0

    # detached: the socket goes with the device
    stack.xenblk("detach", "1", "xvdb", "--sim", str(stack.sim))
    stack.xenblk("detach", "1", "xvdc", "--sim", str(stack.sim))
    assert not os.path.exists(sock) and not os.path.exists(ro_sock)


def test_hostile_clients_beside_a_verified_guest(stack: Stack, tmp_path: Path) -> None:
    """On an allocating qcow2: the guest's verified randrw allocates clusters while hostile clients come and go
    and a good client reads the whole disk through the same image object."""
    qcow = stack.images / "d.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(qcow), str(SIZE))
    stack.attach(1, f"qcow2:{qcow}", "xvdb", "--wait=initwait")
    sock = stack.xenstore("read", f"{B}/51728/physical-device-path")
    guest = stack.guest_proc(1, "--rw", "randrw", "--bs", "4k", "--iodepth", "8", "--verify", "--until-stopped")
    try:
        stack.wait_served(200)
        for _ in range(2):
            c = RawNbd(sock)  # bad option magic
            c.greeting()
            c.option(7, b"\0" * 6, magic=1)
            assert c.at_eof()
            c = RawNbd(sock).connect()  # oversized read: an error, the connection stays
            c.request(CMD_READ, 0, 64 << 20, cookie=3)
            assert c.reply()[:2] == (EINVAL, 3)
            c.s.sendall(REQ_MAGIC.to_bytes(4, "big")[:2])  # then a torn header and gone
            c.close()
            c = RawNbd(sock).connect()  # gone in the middle of a write's payload
            c.request(CMD_WRITE, 0, 1 << 20, payload=b"\xff" * 4096)
            c.close()
            # the connections above end on the server's side after the client saw them end: wait for that
            wait_until(lambda: nbd_stats(stack)["active"] == 0, "the export saw its clients go")
            clients = [RawNbd(sock).connect() for _ in range(8)]  # nbd.max_clients (8) connected...
            extra = RawNbd(sock)
            with pytest.raises((Closed, ConnectionResetError)):
                extra.recv(18)  # ...and one more is closed before the greeting
            for c in [*clients, extra]:
                c.close()
            wait_until(lambda: nbd_stats(stack)["active"] == 0, "the export saw its clients go")
            run("nbdcopy", f"nbd+unix:///?socket={sock}", "null:")  # reads racing the guest's allocations
        before = stack.served(1)
        stack.wait_served(before + 200)  # the guest's disk is still served
    finally:
        guest.send_signal(signal.SIGINT)
        out, err = guest.communicate(timeout=300)
    assert guest.returncode == 0, f"{out}\n{err}\n{stack.log_tail()}"
    disk = json.loads(out)["disks"][0]
    assert disk["errors"] == 0 and disk["verify_errors"] == 0 and disk["verified_reads"] > 0
    c = RawNbd(sock).connect()  # and the export still serves a good client
    assert len(c.read(0, 4096)) == 4096
    c.close()
    st = nbd_stats(stack)
    assert st["refused"] == 2 and st["protocol_errors"] >= 2, st
    assert stack.serve.poll() is None


def test_published_before_the_hotplug_script_reports_connected(tmp_path: Path, sim_dir: Path) -> None:
    """libxl reads physical-device-path once the hotplug script succeeded: it must be there by then (vbd3), and
    never for vbd (backendtype=phy), where libxl would take it for a block device."""
    from tests.test_hotplug import running_host

    with running_host(tmp_path, sim_dir) as host:
        paths = []
        for vdev, btype in (("xvdb", "vbd3"), ("xvdc", "vbd")):
            image = host.stack.images / f"{vdev}.raw"
            image.write_bytes(bytes(1 << 20))
            xp = host.write_libxl_disk(3, vdev, f"aio:{image}" if btype == "vbd3" else str(image), btype=btype)
            host.wait_state(xp, "2")
            b = f"/local/domain/0/{xp}"
            assert host.read(f"{b}/physical-device-path") is None  # no image open before the script asks
            r = host.hotplug("add", xp)
            assert r.returncode == 0, r.stderr + host.stack.log_tail()
            paths.append((xp, b))
        (xp, b), (xp_phy, b_phy) = paths
        sock = host.read(f"{b}/physical-device-path")
        assert sock == f"{tmp_path}/run/nbd/vbd3-3-51728.sock"
        assert json.loads(run("nbdinfo", "--json", f"nbd+unix:///?socket={sock}").stdout)["exports"][0][
            "export-size"] == 1 << 20  # fmt: skip
        assert host.read(f"{b_phy}/physical-device-path") is None
        assert os.path.exists(f"{tmp_path}/run/nbd/vbd-3-51744.sock")  # served all the same, not published
        for x in (xp, xp_phy):
            assert host.libxl_remove(x, 3).returncode == 0
        assert not os.path.exists(sock) and not os.path.exists(f"{tmp_path}/run/nbd/vbd-3-51744.sock")
