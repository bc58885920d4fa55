"""Image ownership and handover (issue 16, "Migration safety"; README "Image ownership and handover").

libxl starts a migration's destination before it destroys the source, so two backends name one
image for a while. Each xenblk open of an image takes an OFD lock on it (read-write: exclusive;
read-only and qcow2 backing files: shared); a device whose image is held waits for it, and the
holder releases it only after its rings drained. Here two `xenblk serve` run on one simulated host
as two backend domains (0 and a driver domain, 5), same wire protocol and XenStore paths as Xen.
Every wait is for a marker (a backend state, the daemon's request counter, its control `list`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.e2e import XENBLK, Stack, free_port, stop
from tests.fixtures.wait import GENEROUS, proc_alive, wait_until
from xenblk import _simguest  # type: ignore[attr-defined]
from xenblk.xen.vdev import vdev_to_devid

MiB = 1 << 20
DRIVER_DOMAIN = 5  # the second daemon's backend domain


@dataclass
class Backend:
    """One `xenblk serve` on the shared simulated host, as backend domain `domid`."""

    domid: int
    sim: Path
    config: Path
    run_dir: Path
    metrics_url: str
    serve: subprocess.Popen[bytes]
    log: Path

    def xenblk(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([*XENBLK, "--config", str(self.config), *args], capture_output=True, text=True,
                           timeout=GENEROUS)  # fmt: skip
        if check and r.returncode != 0:
            raise AssertionError(f"xenblk {' '.join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr}\n{self.tail()}")
        return r

    def attach(self, domid: int, image: Path, vdev: str, *extra: str) -> None:
        self.xenblk("attach", str(domid), str(image), "--vdev", vdev, "--sim", str(self.sim), *extra)

    def guest(self, domid: int, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([*XENBLK, "sim", "guest", "--dir", str(self.sim), "--domid", str(domid), "--json",
                                 *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip

    def state(self, domid: int, vdev: str) -> str:
        path = f"/local/domain/{self.domid}/backend/vbd3/{domid}/{vdev_to_devid(vdev)}/state"
        env = {**os.environ, "XENSTORED_PATH": str(self.sim / "xenstored" / "socket")}
        r = subprocess.run(["xenstore-read", path], capture_output=True, text=True, env=env, timeout=30)
        return r.stdout.strip() if r.returncode == 0 else "absent"

    def wait_state(self, domid: int, vdev: str, state: int) -> None:
        wait_until(lambda: self.state(domid, vdev) == str(state), f"dom{domid} {vdev} of backend {self.domid} in "
                   f"state {state}", alive=proc_alive(self.serve, "xenblk serve"), detail=self.tail)  # fmt: skip

    def device(self, domid: int, vdev: str) -> dict[str, Any]:
        from xenblk.backend import control

        for d in control.call(str(self.run_dir), {"op": "list"}, timeout=30)["devices"]:
            if d["domid"] == domid and d["vdev"] == vdev:
                return dict(d)
        return {}

    def wait_lock_wait(self, domid: int, vdev: str) -> str:
        """The marker of a device waiting for its image: the reason in the control `list`."""
        why: str = wait_until(lambda: self.device(domid, vdev).get("lock_wait"), f"dom{domid} {vdev} waiting for "
                              "its image", alive=proc_alive(self.serve, "xenblk serve"), detail=self.tail)  # fmt: skip
        return why

    def scrape(self) -> str:
        body: bytes = urllib.request.urlopen(self.metrics_url, timeout=30).read()
        return body.decode()

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _start_backend(tmp: Path, sim: Path, images: Path, domid: int) -> Backend:
    tmp.mkdir()
    port = free_port()
    cfg = tmp / "xenblk.toml"
    cfg.write_text(
        f'[daemon]\ndomid = {domid}\nrun_dir = "{tmp}/run"\nstate_dir = "{tmp}/state"\n'
        f'[storage]\nallowed_dirs = ["{images}"]\n[metrics]\nlisten = "127.0.0.1:{port}"\n'
        '[log]\nformat = "json"\nlevel = "debug"\n'
    )
    log = tmp / "serve.log"
    serve = subprocess.Popen([*XENBLK, "--config", str(cfg), "serve", "--sim", str(sim), "--no-uevents"],
                             stdout=open(log, "wb"), stderr=subprocess.STDOUT)  # fmt: skip  # noqa: SIM115
    url = f"http://127.0.0.1:{port}/metrics"
    wait_until(lambda: urllib.request.urlopen(url, timeout=2).read() is not None, "second xenblk serve ready",
               alive=proc_alive(serve, "second xenblk serve"))  # fmt: skip
    return Backend(domid, sim, cfg, tmp / "run", url, serve, log)


@pytest.fixture
def two(stack: Stack, tmp_path: Path) -> Iterator[tuple[Backend, Backend]]:
    """The `stack` daemon as backend domain 0, and a second daemon as driver domain 5, one sim host."""
    first = Backend(0, stack.sim, stack.config, tmp_path / "run", stack.metrics_url, stack.serve, stack.serve_log)
    second = _start_backend(tmp_path / "b5", stack.sim, stack.images, DRIVER_DOMAIN)
    try:
        yield first, second
    finally:
        stop(second.serve)


def _result(proc: subprocess.Popen[str], what: str) -> dict[str, Any]:
    out, err = proc.communicate(timeout=GENEROUS)
    assert proc.returncode == 0, f"{what}: exit {proc.returncode}\n{out}\n{err}"
    (disk,) = json.loads(out)["disks"]
    assert disk["errors"] == 0 and disk["verify_errors"] == 0, disk
    return dict(disk)


def _blocks_hold(data: bytes, first: int, last: int, seed: int, bs: int = 4096) -> list[int]:
    """The blocks in [first, last) that do not hold generation 1 of `seed` (the sim guest's pattern)."""
    lib = _simguest.lib
    return [b for b in range(first, last) if lib.xb_sg_pattern_check(data[b * bs : (b + 1) * bs], b * bs, bs,
                                                                       seed, 1) != -1]  # fmt: skip


def test_guest_moves_to_another_backend_domain(two: tuple[Backend, Backend], stack: Stack) -> None:
    """The source serves a verified write workload; the destination's device, created meanwhile, does
    not open the image (B stays Initialising, its guest waits) while the source keeps writing; once the
    source guest stopped and its device is detached (drained, flushed, closed), the destination gets
    the image and its guest writes over a region the source kept rewriting until then. Without the
    lock the destination would have connected at once and the source's later passes would have
    overwritten the destination's acknowledged writes."""
    src, dst = two
    img = stack.images / "disk.raw"
    with open(img, "wb") as f:
        f.truncate(4 * MiB)  # 1024 blocks of 4 KiB: the source rewrites every block many times over
    src.attach(1, img, "xvdb")
    g1 = src.guest(1, "--rw", "write", "--bs", "4k", "--iodepth", "8", "--queues", "1", "--verify", "--seed", "21",
                   "--until-stopped")  # fmt: skip
    g2: subprocess.Popen[str] | None = None
    try:
        src.wait_state(1, "xvdb", 4)
        served = _served(src, 1)
        wait_until(lambda: _served(src, 1) > 2 * 1024 + 100, "the source's first pass over the disk",
                   alive=proc_alive(g1, "source guest"), detail=src.tail)  # fmt: skip
        # The destination is created first, as libxl does: its device must wait for the image.
        dst.attach(2, img, "xvdb")
        why = dst.wait_lock_wait(2, "xvdb")
        assert "in use" in why and "read-write" in why, why
        assert dst.state(2, "xvdb") == "1"  # no InitWait: the image is not open
        assert 'xenblk_device_image_lock_wait{domid="2",vdev="xvdb"} 1.0' in dst.scrape()
        assert "waiting for the image" in dst.xenblk("list", "--sim", str(dst.sim)).stdout
        g2 = dst.guest(2, "--rw", "write", "--bs", "4k", "--iodepth", "8", "--queues", "1", "--verify", "--seed",
                       "22", "--size", str(1 * MiB), "--timeout", str(int(GENEROUS)))  # fmt: skip
        # Once the destination's guest runs (it holds its domain's lock file), the source goes on writing
        # the whole disk, four more passes (a write and its verifying read per block), while that guest
        # waits to connect: a destination that did not wait would have written its region meanwhile, and
        # these passes would have overwritten it.
        wait_until(lambda: (stack.sim / "guest-2.lock").read_text().strip().isdigit(), "the destination's "
                   "guest running", alive=proc_alive(g2, "destination guest"))  # fmt: skip
        served = _served(src, 1)
        wait_until(lambda: _served(src, 1) > served + 4 * 2 * 1024, "the source writing on while the "
                   "destination waits", alive=proc_alive(g1, "source guest"), detail=src.tail)  # fmt: skip
        assert dst.state(2, "xvdb") == "1" and g2.poll() is None
        # The move: the source guest stops (drains, closes its frontend), the toolstack detaches the source.
        g1.send_signal(signal.SIGTERM)
        d1 = _result(g1, "source guest")
        assert d1["writes"] > 2 * 1024, d1  # more than two passes, each verified as it went
        assert dst.device(2, "xvdb").get("lock_wait"), "a frontend that closed does not release the image"
        src.xenblk("detach", "1", "xvdb", "--sim", str(src.sim))  # returns once Closed: image released first
        d2 = _result(g2, "destination guest")
        assert d2["writes"] == 256 and d2["verified_reads"] == 256, d2
        assert "device.image_lock_acquired" in dst.log.read_text()
        assert 'xenblk_device_image_lock_wait{domid="2",vdev="xvdb"} 0.0' in dst.scrape()
        dst.xenblk("detach", "2", "xvdb", "--sim", str(dst.sim))
    finally:
        for g in (g1, g2):
            if g is not None and g.poll() is None:
                g.kill()
                g.communicate()
    data = img.read_bytes()
    # The destination's writes are all there (nothing of the source landed after them), and every
    # other block holds the source's data.
    assert _blocks_hold(data, 0, 256, 22) == []
    assert _blocks_hold(data, 256, 1024, 21) == []


def _served(b: Backend, domid: int) -> int:
    import re

    total = 0
    for m in re.finditer(r'^xenblk_requests_total\{domid="(\d+)",[^}]*\} (\S+)$', b.scrape(), re.M):
        if int(m.group(1)) == domid:
            total += int(float(m.group(2)))
    return total


def test_sharing_and_a_killed_holder(two: tuple[Backend, Backend], stack: Stack) -> None:
    """ro + ro share an image across daemons; a second read-write open waits with its reason, in
    another daemon and in the same one; kill -9 of the holder: the kernel drops its lock and the
    waiter goes on to InitWait."""
    src, dst = two
    rw, ro = stack.images / "rw.raw", stack.images / "ro.raw"
    for p in (rw, ro):
        with open(p, "wb") as f:
            f.truncate(1 * MiB)
    src.attach(1, ro, "xvdc", "--mode", "r")
    dst.attach(2, ro, "xvdc", "--mode", "r")
    src.wait_state(1, "xvdc", 2)
    dst.wait_state(2, "xvdc", 2)  # both opened it: read locks share
    src.attach(1, rw, "xvdb")
    src.wait_state(1, "xvdb", 2)  # InitWait: open and locked read-write
    dst.attach(2, rw, "xvdb", "--mode", "r")
    assert "holds it read-write" in dst.wait_lock_wait(2, "xvdb")  # not even read-only while someone writes
    src.attach(3, rw, "xvdd")  # a second device of the same daemon
    assert "holds it read-write" in src.wait_lock_wait(3, "xvdd")
    assert src.state(3, "xvdd") == "1" and dst.state(2, "xvdb") == "1"
    src.serve.kill()
    assert src.serve.wait(timeout=GENEROUS) == -signal.SIGKILL
    dst.wait_state(2, "xvdb", 2)
    assert dst.device(2, "xvdb").get("lock_wait") is None


def test_lock_rules_at_open(tmp_path: Path) -> None:
    """What imagespec.open_image (the daemon's only way in) allows at once, in one process (two devices
    of one daemon): rw excludes everyone, ro shares with ro, qcow2 backing files are shared read-only
    and cannot be opened read-write while an overlay stands on them; closing releases."""
    from xenblk.backend.imagespec import ImageBusy, open_image, parse_params

    images, base = tmp_path / "images", tmp_path / "base"
    images.mkdir()
    base.mkdir()
    raw, b = images / "a.raw", base / "b.raw"
    for p in (raw, b):
        with open(p, "wb") as f:
            f.truncate(MiB)
    for name in ("o1.qcow2", "o2.qcow2"):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(b), "-F", "raw", str(images / name)],
                       check=True)  # fmt: skip

    def opn(params: str, mode: str = "w") -> Any:
        return open_image(parse_params(params, mode), [str(images), str(base)], "writeback",
                          backing_dirs=[str(base)])  # fmt: skip

    with opn(str(raw)):
        for mode in ("w", "r"):
            with pytest.raises(ImageBusy, match="holds it read-write"):
                opn(str(raw), mode)
    with (  # read-only users share; a writer waits for them
        opn(str(raw), "r"),
        opn(str(raw), "r"),
        pytest.raises(ImageBusy, match=r"holds it read-only.*cannot be opened read-write"),
    ):
        opn(str(raw))
    with opn(str(raw)):
        pass  # released by close
    with (  # one base under two overlays: both read-lock it, so it cannot be opened read-write
        opn(f"qcow2:{images / 'o1.qcow2'}"),
        opn(f"qcow2:{images / 'o2.qcow2'}"),
        pytest.raises(ImageBusy, match="holds it read-only"),
    ):
        opn(str(b))
    with opn(str(b)), pytest.raises(ImageBusy, match=r"b\.raw: in use"):  # an overlay waits for its backing file
        opn(f"qcow2:{images / 'o1.qcow2'}")
