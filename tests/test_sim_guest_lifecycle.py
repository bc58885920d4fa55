"""The simulated blkfront follows its backend while connected, through the CLI (`xenblk serve --sim`):
an online resize is seen and the grown area used, and `xenblk detach` of a running guest's disk
drains, closes both sides and leaves the image consistent with what was acknowledged."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.fixtures.e2e import Stack
from tests.fixtures.wait import GENEROUS, wait_until
from xenblk.sim.guest_native import ffi, lib
from xenblk.xen.vdev import vdev_to_devid

MiB = 1 << 20


def frontend_state(stack: Stack, domid: int, vdev: str) -> str:
    try:
        return stack.xenstore("read", f"/local/domain/{domid}/device/vbd/{vdev_to_devid(vdev)}/state")
    except AssertionError:
        return "absent"


def wait_frontend_connected(stack: Stack, domid: int, vdev: str, guest: subprocess.Popen[str]) -> None:
    wait_until(lambda: frontend_state(stack, domid, vdev) == "4", f"dom{domid} {vdev} frontend Connected",
               interval=0.1, alive=lambda: None if guest.poll() is None else f"the guest ended: {guest.communicate()}",
               detail=stack.log_tail)  # fmt: skip


def bad_sectors(data: bytes, base: int, versions: list[tuple[int, int]]) -> list[int]:
    """Offsets of 512-byte sectors that hold none of the (seed, generation) patterns."""
    buf = ffi.from_buffer(data)
    bad = []
    for off in range(0, len(data), 512):
        if all(lib.xb_sg_pattern_check(buf + off, base + off, 512, seed, gen) >= 0 for seed, gen in versions):
            bad.append(base + off)
    return bad


def test_resize_is_seen_by_the_running_guest_and_the_grown_area_used(stack: Stack) -> None:
    img = stack.images / "grow.raw"
    img.write_bytes(b"")
    subprocess.run(["truncate", "-s", "16M", str(img)], check=True)
    stack.attach(3, str(img), "xvdb")
    guest = stack.guest_proc(3, "--expect-resize", "--rw", "write", "--bs", "64k", "--iodepth", "4", "--verify",
                             "--seed", "5")  # fmt: skip
    try:
        wait_frontend_connected(stack, 3, "xvdb", guest)
        subprocess.run(["truncate", "-s", "48M", str(img)], check=True)
        stack.xenblk("resize", "3", "xvdb", "--sim", str(stack.sim))
        out, err = guest.communicate(timeout=300)
    finally:
        if guest.poll() is None:
            guest.kill()
            guest.communicate()
    assert guest.returncode == 0, f"{out}{err}\n{stack.log_tail()}"
    (disk,) = json.loads(out)["disks"]
    assert disk["sectors"] == 48 * MiB // 512 and disk["resizes"] == 1
    # The whole grown disk was written and every block read back verified, the new end included.
    assert disk["writes"] == disk["verified_reads"] == 48 * MiB // (64 << 10)
    assert disk["errors"] == disk["verify_errors"] == 0
    with open(img, "rb") as f:
        f.seek(48 * MiB - MiB)
        tail = f.read()
    assert len(tail) == MiB and bad_sectors(tail, 48 * MiB - MiB, [(5, 1)]) == []


def test_detach_of_a_running_guest_drains_closes_and_keeps_acknowledged_data(stack: Stack, tmp_path: Path) -> None:
    img = stack.images / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "8M"], check=True)
    spare = stack.images / "spare.raw"
    subprocess.run(["truncate", "-s", "8M", str(spare)], check=True)
    stack.attach(4, f"qcow2:{img}", "xvdb")
    stack.attach(4, str(spare), "xvdc")
    # Everything written and acknowledged once (seed 1)...
    rc, result = stack.guest(4, "--vdev", "xvdb", "--rw", "write", "--bs", "64k", "--iodepth", "4", "--seed", "1")
    assert rc == 0, result
    # ...then overwritten in order (seed 2, one at a time, pass after pass) while the disk is detached
    # under the guest: every write acknowledged before the detach is a prefix of the first pass.
    guest = stack.guest_proc(4, "--rw", "write", "--bs", "16k", "--iodepth", "1", "--until-stopped",
                             "--seed", "2")  # fmt: skip
    try:
        wait_frontend_connected(stack, 4, "xvdb", guest)
        # writes in flight on both disks: the daemon has answered some of each
        stack.wait_served(20, 4, "xvdb")
        stack.wait_served(20, 4, "xvdc")
        r = stack.xenblk("detach", "4", "xvdb", "--sim", str(stack.sim), check=False, timeout=GENEROUS)
        if r.returncode != 0:
            guest.terminate()
            raise AssertionError(f"{r.stderr}\nguest: {guest.communicate(timeout=60)}")
        assert "detached xvdb from domain 4" in r.stdout
        assert frontend_state(stack, 4, "xvdb") == "absent"
        assert guest.poll() is None, "the other disk keeps the guest running"
        # The other disk is still served until the guest is told to stop.
        assert frontend_state(stack, 4, "xvdc") == "4"
        stack.wait_backend(4, "xvdc", 4)
        guest.terminate()
        out, err = guest.communicate(timeout=GENEROUS)
    finally:
        if guest.poll() is None:
            guest.kill()
            guest.communicate()
    assert guest.returncode == 1, "an interrupted workload is not a success"
    assert "xvdb: detached by the backend (state 5 Closing, online=0: the toolstack detached it)" in err
    disks = {d["vdev"]: d for d in json.loads(out)["disks"]}
    gone, other = disks["xvdb"], disks["xvdc"]
    assert gone["detached"] is True and gone["writes"] > 0 and gone["errors"] == 0
    assert "detached" not in other and "error" not in other and other["writes"] > 0
    for path in ("/local/domain/4/device/vbd/51728", "/local/domain/0/backend/vbd3/4/51728"):
        with pytest.raises(AssertionError):
            stack.xenstore("exists", path)
    assert subprocess.run(["qemu-img", "check", "-q", str(img)]).returncode == 0
    flat = tmp_path / "flat.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(img), str(flat)], check=True)
    data = flat.read_bytes()
    acknowledged = min(gone["writes"], len(data) // (16 << 10)) * (16 << 10)
    assert bad_sectors(data[:acknowledged], 0, [(2, 1)]) == [], "an acknowledged write is missing"
    assert bad_sectors(data[acknowledged:], acknowledged, [(1, 1), (2, 1)]) == []
    listing = json.loads(stack.xenblk("list", "--json", "--sim", str(stack.sim)).stdout)
    assert [(d["domid"], d["vdev"]) for d in listing] == [(4, "xvdc")]


def test_idle_guest_ends_once_its_only_disk_is_detached(stack: Stack) -> None:
    img = stack.images / "idle.raw"
    subprocess.run(["truncate", "-s", "4M", str(img)], check=True)
    stack.attach(5, str(img), "xvdb")
    guest = stack.guest_proc(5, "--idle", "--until-stopped")
    try:
        wait_frontend_connected(stack, 5, "xvdb", guest)
        stack.xenblk("detach", "5", "xvdb", "--sim", str(stack.sim), timeout=GENEROUS)
        out, err = guest.communicate(timeout=GENEROUS)
    finally:
        if guest.poll() is None:
            guest.kill()
            guest.communicate()
    # Nothing was interrupted: an idle disk taken away is not a failure.
    assert guest.returncode == 0, f"{out}{err}"
    (disk,) = json.loads(out)["disks"]
    assert disk["detached"] is True and "error" not in disk
    assert frontend_state(stack, 5, "xvdb") == "absent"
