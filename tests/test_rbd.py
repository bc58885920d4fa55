"""RBD disks end to end against a real Ceph cluster (tests/fixtures/ceph.py): a simulated guest's
verified workload through `xenblk serve`, the image compared with a raw twin by `rbd export`,
discard reaching RADOS, a snapshot served read-only, the exclusive lock between two daemons (two
simulated hosts = two Dom0s, one image), and the cluster stopped under I/O."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.ceph import CephCluster
from tests.fixtures.e2e import Stack, free_port, run_stack
from tests.fixtures.wait import GENEROUS, proc_alive, wait_until
from tests.test_e2e_sim import disks_of

MiB = 1 << 20


@contextlib.contextmanager
def rbd_stack(tmp: Path, cluster: CephCluster, extra: str = "") -> Iterator[Stack]:
    sim = Path(tempfile.mkdtemp(prefix="sim-"))  # short: the sim host's socket paths
    try:
        with run_stack(tmp, sim, cluster.client_config() + extra) as s:
            yield s
    finally:
        shutil.rmtree(sim, ignore_errors=True)


@pytest.fixture(scope="module")
def rstack(ceph_cluster: CephCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with rbd_stack(tmp_path_factory.mktemp("rbd"), ceph_cluster) as s:
        yield s


def ok(rc: int, result: object, stack: Stack) -> list[dict]:  # type: ignore[type-arg]
    assert rc == 0, f"{result}\n{stack.log_tail()}"
    disks = disks_of(result)
    for d in disks:
        assert d.get("errors", 0) == 0 and d.get("verify_errors", 0) == 0, d
    return disks


def log_events(stack: Stack) -> list[dict]:  # type: ignore[type-arg]
    out = []
    for line in stack.serve_log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def test_verified_workload_and_export_equals_raw_twin(rstack: Stack, ceph_cluster: CephCluster,
                                                      tmp_path: Path) -> None:  # fmt: skip
    ceph_cluster.create_image("twin", "8M")
    raw = rstack.images / "twin.raw"
    raw.write_bytes(b"")
    with raw.open("r+b") as f:
        f.truncate(8 * MiB)
    rstack.attach(1, f"rbd:{ceph_cluster.pool}/twin", "xvdb")
    rstack.attach(1, str(raw), "xvdc")
    # The same seeded workload on both disks: every block once, in random order, two queues.
    ok(*rstack.guest(1, "--rw", "randwrite", "--bs", "4k", "--iodepth", "16", "--queues", "2", "--verify",
                     "--seed", "7", "--flush-every", "64", "--indirect"), rstack)  # fmt: skip
    exported = tmp_path / "twin.export"
    ceph_cluster.run("rbd", "export", f"{ceph_cluster.pool}/twin", str(exported))
    assert exported.read_bytes() == raw.read_bytes()
    # Mixed reads and writes, large requests, verified, on the RBD disk alone.
    ok(*rstack.guest(1, "--vdev", "xvdb", "--rw", "randrw", "--bs", "64k", "--iodepth", "8", "--verify",
                     "--seed", "9", "--size", "8M"), rstack)  # fmt: skip
    rstack.xenblk("detach", "1", "xvdb", "--sim", str(rstack.sim))
    rstack.xenblk("detach", "1", "xvdc", "--sim", str(rstack.sim))


def test_discard_reaches_rados(rstack: Stack, ceph_cluster: CephCluster) -> None:
    ceph_cluster.create_image("trim", "8M", "--object-size", "1M")
    rstack.attach(2, f"rbd:{ceph_cluster.pool}/trim", "xvdb")
    ok(*rstack.guest(2, "--rw", "write", "--bs", "1M", "--seed", "1", "--indirect"), rstack)
    full = ceph_cluster.used_bytes("trim")
    assert full == 8 * MiB
    # Whole objects: librbd removes them (a partial-object discard may be skipped: rbd_skip_partial_discard).
    ok(*rstack.guest(2, "--rw", "trim", "--bs", "1M"), rstack)
    assert ceph_cluster.used_bytes("trim") == 0
    rstack.xenblk("detach", "2", "xvdb", "--sim", str(rstack.sim))


def test_snapshot_is_served_read_only(rstack: Stack, ceph_cluster: CephCluster, tmp_path: Path) -> None:
    pool = ceph_cluster.pool
    ceph_cluster.create_image("snapped", "4M")
    rstack.attach(3, f"rbd:{pool}/snapped", "xvdb")
    ok(*rstack.guest(3, "--rw", "write", "--bs", "64k", "--seed", "5"), rstack)
    before, snap, live = tmp_path / "before", tmp_path / "snap", tmp_path / "live"
    ceph_cluster.run("rbd", "export", f"{pool}/snapped", str(before))
    ceph_cluster.run("rbd", "snap", "create", f"{pool}/snapped@s1")
    rstack.attach(3, f"rbd:{pool}/snapped@s1", "xvdc")  # asked read-write: a snapshot is served read-only
    # The live image moves on; the snapshot keeps what was written before it.
    ok(*rstack.guest(3, "--vdev", "xvdb", "--rw", "write", "--bs", "64k", "--seed", "6"), rstack)
    rc, result = rstack.guest(3, "--vdev", "xvdc", "--rw", "write", "--bs", "64k", "--seed", "6", "--size", "64k")
    assert rc != 0, f"a write to the snapshot succeeded: {result}"
    connected = [e for e in log_events(rstack) if e.get("event") == "device.connected" and e.get("domid") == 3]
    assert connected and all(e["readonly"] for e in connected if e["vdev"] == "xvdc"), connected
    ceph_cluster.run("rbd", "export", f"{pool}/snapped@s1", str(snap))
    ceph_cluster.run("rbd", "export", f"{pool}/snapped", str(live))
    assert snap.read_bytes() == before.read_bytes(), "the snapshot does not hold the data written before it"
    assert live.read_bytes() != before.read_bytes()
    rstack.xenblk("detach", "3", "xvdb", "--sim", str(rstack.sim))
    rstack.xenblk("detach", "3", "xvdc", "--sim", str(rstack.sim))


def backend_state(stack: Stack, domid: int, vdev: str) -> str:
    from xenblk.xen.vdev import vdev_to_devid

    try:
        return stack.xenstore("read", f"/local/domain/0/backend/vbd3/{domid}/{vdev_to_devid(vdev)}/state")
    except AssertionError:
        return "absent"


def test_second_daemon_waits_for_the_exclusive_lock(rstack: Stack, ceph_cluster: CephCluster,
                                                    tmp_path: Path) -> None:  # fmt: skip
    """Two simulated hosts (two Dom0s, each its own xenstored and daemon), one image: the second
    daemon does not serve it while the first's guest writes, and takes over once the first closed."""
    pool = ceph_cluster.pool
    ceph_cluster.create_image("moved", "16M")
    rstack.attach(4, f"rbd:{pool}/moved", "xvdb")
    writer = rstack.guest_proc(4, "--rw", "randrw", "--bs", "4k", "--iodepth", "8", "--verify", "--seed", "11",
                               "--until-stopped")  # fmt: skip
    try:
        rstack.wait_served(200, domid=4)
        with rbd_stack(tmp_path / "b", ceph_cluster) as other:
            other.attach(4, f"rbd:{pool}/moved", "xvdb")
            wait_until(lambda: any(e.get("event") == "device.rbd_lock_wait" for e in log_events(other)),
                       "the second daemon waits for the lock", GENEROUS, interval=0.1,
                       alive=proc_alive(other.serve, "second xenblk serve"), detail=other.log_tail)  # fmt: skip
            # Still waiting: nothing advertised to its guest, so nothing it could write.
            assert backend_state(other, 4, "xvdb") not in ("2", "4"), other.log_tail()
            # A device waiting for the lock can be detached (and attached again, waiting again).
            other.xenblk("detach", "4", "xvdb", "--sim", str(other.sim))
            assert backend_state(other, 4, "xvdb") == "absent"
            other.attach(4, f"rbd:{pool}/moved", "xvdb")
            wait_until(lambda: sum(e.get("event") == "device.rbd_lock_wait" for e in log_events(other)) == 2,
                       "the second daemon waits for the lock again", GENEROUS, interval=0.1,
                       alive=proc_alive(other.serve, "second xenblk serve"), detail=other.log_tail)  # fmt: skip
            served = rstack.served(domid=4)
            rstack.wait_served(served + 100, domid=4)  # the first daemon's guest keeps writing meanwhile
            assert writer.poll() is None
            writer.terminate()
            out, err = writer.communicate(timeout=GENEROUS)
            ok(writer.returncode, json.loads(out) if out.strip() else err, rstack)
            rstack.xenblk("detach", "4", "xvdb", "--sim", str(rstack.sim))  # drained, Closed, lock released
            other.wait_backend(4, "xvdb", 2)
            acquired = [e for e in log_events(other) if e.get("event") == "device.rbd_lock_acquired"]
            assert acquired and acquired[-1]["waited"], acquired
            ok(*other.guest(4, "--rw", "randrw", "--bs", "4k", "--iodepth", "8", "--verify", "--seed", "12",
                            "--size", "8M"), other)  # fmt: skip
            other.xenblk("detach", "4", "xvdb", "--sim", str(other.sim))
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()


def test_cluster_paused_under_io_waits_then_completes(rstack: Stack, ceph_cluster: CephCluster) -> None:
    ceph_cluster.create_image("paused", "16M")
    rstack.attach(5, f"rbd:{ceph_cluster.pool}/paused", "xvdb")
    guest = rstack.guest_proc(5, "--rw", "randrw", "--bs", "4k", "--iodepth", "8", "--verify", "--seed", "13",
                              "--until-stopped", "--flush-every", "16")  # fmt: skip
    try:
        rstack.wait_served(100, domid=5)
        ceph_cluster.pause_osd()
        try:
            # Requests the OSD does not answer stay in flight until the guest's whole queue depth waits;
            # nothing fails meanwhile.
            wait_until(lambda: inflight(rstack, 5) >= 8, "the guest's 8 requests waiting for the stopped cluster",
                       GENEROUS, interval=0.1)  # fmt: skip
            stuck = rstack.served(domid=5)
            assert guest.poll() is None and rstack.serve.poll() is None
        finally:
            ceph_cluster.resume_osd()
        rstack.wait_served(stuck + 200, domid=5)
        guest.terminate()
        out, err = guest.communicate(timeout=GENEROUS)
        ok(guest.returncode, json.loads(out) if out.strip() else err, rstack)
    finally:
        if guest.poll() is None:
            guest.kill()
            guest.wait()
    rstack.xenblk("detach", "5", "xvdb", "--sim", str(rstack.sim))


def inflight(stack: Stack, domid: int) -> int:
    import re

    total = 0
    for m in re.finditer(r"^xenblk_inflight_requests\{([^}]*)\} (\S+)$", stack.scrape(), re.M):
        if f'domid="{domid}"' in m.group(1):
            total += int(float(m.group(2)))
    return total


def test_cluster_paused_past_op_timeout_fails_io_daemon_lives(ceph_cluster: CephCluster, tmp_path: Path) -> None:
    ceph_cluster.create_image("timeout", "8M")
    with rbd_stack(tmp_path, ceph_cluster, "op_timeout = 2\n") as s:
        s.attach(6, f"rbd:{ceph_cluster.pool}/timeout", "xvdb")
        ok(*s.guest(6, "--rw", "write", "--bs", "64k", "--seed", "2"), s)
        ceph_cluster.pause_osd()
        try:
            rc, result = s.guest(6, "--rw", "write", "--bs", "64k", "--seed", "3", "--size", "64k")
        finally:
            ceph_cluster.resume_osd()
        assert rc != 0, result
        disks = disks_of(result)
        assert disks and disks[0]["errors"] > 0, result
        assert s.serve.poll() is None, s.log_tail()
        # The cluster is back: the same disk serves again, verified.
        ok(*s.guest(6, "--rw", "randrw", "--bs", "4k", "--iodepth", "4", "--verify", "--seed", "4",
                    "--size", "1M"), s)  # fmt: skip
        s.xenblk("detach", "6", "xvdb", "--sim", str(s.sim))


def test_image_grown_with_rbd_resize_reaches_the_guest(rstack: Stack, ceph_cluster: CephCluster) -> None:
    ceph_cluster.create_image("grown", "8M")
    rstack.attach(7, f"rbd:{ceph_cluster.pool}/grown", "xvdb")
    guest = rstack.guest_proc(7, "--expect-resize", "--rw", "randrw", "--bs", "4k", "--iodepth", "4", "--verify",
                              "--seed", "8")  # fmt: skip
    try:
        rstack.wait_backend(7, "xvdb", 4)
        ceph_cluster.run("rbd", "resize", "--size", "12M", f"{ceph_cluster.pool}/grown")  # from another client
        out, err = guest.communicate(timeout=GENEROUS)
    finally:
        if guest.poll() is None:
            guest.kill()
            guest.wait()
    disks = ok(guest.returncode, json.loads(out) if out.strip() else err, rstack)
    assert disks[0]["sectors"] == 12 * MiB // 512 and disks[0]["resizes"] >= 1, disks
    rstack.xenblk("detach", "7", "xvdb", "--sim", str(rstack.sim))


def test_first_daemon_killed_second_takes_over_after_blocklist(rstack: Stack, ceph_cluster: CephCluster,
                                                               tmp_path: Path) -> None:  # fmt: skip
    """kill -9 of the daemon holding the lock: the second waits until librbd found the holder dead
    (its watch expired), blocklisted it and broke the lock; every write the first acknowledged is there."""
    import signal

    pool = ceph_cluster.pool
    ceph_cluster.create_image("crashed", "8M")
    acked = tmp_path / "acked"
    with rbd_stack(tmp_path / "a", ceph_cluster) as first:
        first.attach(8, f"rbd:{pool}/crashed", "xvdb")
        ok(*first.guest(8, "--rw", "write", "--bs", "64k", "--seed", "21", "--flush-every", "8"), first)
        ceph_cluster.run("rbd", "export", f"{pool}/crashed", str(acked))
        first.serve.send_signal(signal.SIGKILL)  # holding the lock, image open
        first.serve.wait()
        holders = ceph_cluster.json("rbd", "lock", "ls", f"{pool}/crashed")
        assert holders, "the killed daemon's lock is gone already"
    second = rstack  # the other Dom0
    second.attach(8, f"rbd:{pool}/crashed", "xvdb")
    second.wait_backend(8, "xvdb", 2)
    taken = [e for e in log_events(second) if e.get("event") == "device.rbd_lock_taken_over" and e.get("domid") == 8]
    assert taken, second.log_tail()
    blocklist = ceph_cluster.run("ceph", "osd", "blocklist", "ls").stdout
    owner_addr = taken[-1]["previous_owner"].split()[-1]
    assert owner_addr.split("/")[-1] in blocklist, (owner_addr, blocklist)
    after = tmp_path / "after"
    ceph_cluster.run("rbd", "export", f"{pool}/crashed", str(after))
    assert after.read_bytes() == acked.read_bytes()
    ok(*second.guest(8, "--rw", "randrw", "--bs", "4k", "--iodepth", "4", "--verify", "--seed", "22",
                     "--size", "1M"), second)  # fmt: skip
    second.xenblk("detach", "8", "xvdb", "--sim", str(second.sim))


def test_image_api_writes_only_under_the_lock(ceph_cluster: CephCluster) -> None:
    """The synchronous ops (xenblk.storage.Image over the RBD driver) and the driver's own gate: no
    write before the exclusive lock, none on a snapshot, none from a second client while it is held."""
    from xenblk import rbd
    from xenblk.config import RbdConfig
    from xenblk.storage import StorageError
    from xenblk.xen.params import parse_rbd

    pool = ceph_cluster.pool
    ceph_cluster.create_image("api", "4M")
    cfg = RbdConfig(allowed_pools=[pool], conf_file=str(ceph_cluster.conf), keyring=str(ceph_cluster.keyring))
    with rbd.open_image(parse_rbd(f"{pool}/api"), cfg) as img:
        assert (img.size, img.format, img.readonly) == (4 * MiB, "rbd", False)
        with pytest.raises(StorageError, match="Read-only"):
            img.write(0, b"x" * 4096)
        assert rbd.acquire_lock(img) == ""
        img.write(512, b"a" * 8192)
        img.flush()
        assert img.read(0, 512 + 8192 + 512) == b"\0" * 512 + b"a" * 8192 + b"\0" * 512
        img.write_zeroes(1024, 1024)
        assert img.read(512, 2048) == b"a" * 512 + b"\0" * 1024 + b"a" * 512
        with rbd.open_image(parse_rbd(f"{pool}/api"), cfg) as other:
            with pytest.raises(rbd.LockBusy) as busy:
                rbd.acquire_lock(other)
            assert busy.value.owner
            with pytest.raises(StorageError, match="Read-only"):
                other.write(0, b"y" * 512)
        # Another librbd client that writes without taking the lock itself is refused by librbd.
        r = ceph_cluster.run("rbd", "bench", "--io-type", "write", "--io-size", "4K", "--io-total", "4K",
                             f"{pool}/api", check=False, timeout=GENEROUS)  # fmt: skip
        assert r.returncode != 0, r.stdout
        assert img.read(512, 4) == b"aaaa"
        ceph_cluster.run("rbd", "snap", "create", f"{pool}/api@s")
    with rbd.open_image(parse_rbd(f"{pool}/api@s"), cfg) as snap:
        assert snap.readonly
        assert rbd.acquire_lock(snap) == ""  # nothing to take for a read-only image
        with pytest.raises(StorageError):
            snap.write(0, b"z" * 512)
        assert snap.read(512, 4) == b"aaaa"


def test_pool_tables_choose_cluster_user_and_keyring(ceph_cluster: CephCluster, tmp_path: Path) -> None:
    """[rbd.pools.NAME] (docs/config.md): a disk's params name picks the table, and the table's conf file,
    cephx user and keyring are the ones used. [rbd] here points at a cluster that is not there, `dr` at the
    real one as a user of its own (rbd profile on the pool), `stolen` at the real one as that user with the
    admin's keyring; rbd:dr/... serves a verified guest, the other two fail each with its own reason."""
    from xenblk.xen.vdev import vdev_to_devid

    pool = ceph_cluster.pool
    ceph_cluster.create_image("tabled", "4M")
    dr_keyring = tmp_path / "client.xbdr.keyring"
    ceph_cluster.run("ceph", "auth", "get-or-create", "client.xbdr", "mon", "profile rbd", "osd",
                     f"profile rbd pool={pool}", "-o", str(dr_keyring))  # fmt: skip
    nowhere = tmp_path / "nowhere.conf"  # a monitor address nothing listens on
    nowhere.write_text(f"[global]\nmon host = v2:127.0.0.1:{free_port()}\nms bind msgr1 = false\n")
    config = (
        f'[rbd]\nallowed_pools = ["{pool}"]\nconf_file = "{nowhere}"\nkeyring = "{ceph_cluster.keyring}"\n'
        "connect_timeout = 2\n"
        f'[rbd.pools.dr]\npool = "{pool}"\nconf_file = "{ceph_cluster.conf}"\nclient_id = "xbdr"\n'
        f'keyring = "{dr_keyring}"\nconnect_timeout = 60\n'
        f'[rbd.pools.stolen]\npool = "{pool}"\nconf_file = "{ceph_cluster.conf}"\nclient_id = "xbdr"\n'
        f'keyring = "{ceph_cluster.keyring}"\nconnect_timeout = 60\n'
    )
    sim = Path(tempfile.mkdtemp(prefix="sim-"))
    try:
        with run_stack(tmp_path / "s", sim, config) as s:
            s.attach(9, "rbd:dr/tabled", "xvdb")
            ok(*s.guest(9, "--rw", "randrw", "--bs", "4k", "--iodepth", "4", "--verify", "--seed", "31"), s)
            s.attach(9, f"rbd:{pool}/tabled", "xvdc")  # [rbd]'s own settings: the cluster that is not there
            s.attach(9, "rbd:stolen/tabled", "xvdd")
            errors = {}
            for vdev in ("xvdc", "xvdd"):
                s.wait_backend(9, vdev, 6)
                errors[vdev] = s.xenstore("read", f"/local/domain/0/backend/vbd3/9/{vdev_to_devid(vdev)}/error")
            assert f"conf {nowhere}" in errors["xvdc"], errors
            assert "rbd:stolen/tabled ([rbd.pools.stolen])" in errors["xvdd"], errors
            assert "client.xbdr" in errors["xvdd"] and "Permission denied" in errors["xvdd"], errors
            assert s.serve.poll() is None, s.log_tail()
            s.xenblk("detach", "9", "xvdb", "--sim", str(s.sim))
    finally:
        shutil.rmtree(sim, ignore_errors=True)
