"""contrib/xen/block-xenblk (the hotplug script libxl runs for `script=block-xenblk`) on the simulated
host: the backend dir is written the way libxl_disk.c/libxl_device.c write it (one transaction, B/script,
params `aio:PATH` for backendtype=tap -> vbd3, a bare path for backendtype=phy -> vbd), then, as libxl,
this test waits for InitWait, runs `block-xenblk add` with XENBUS_PATH=backend/<type>/<domid>/<devid>,
lets a simulated guest run a verified workload, and tears down as libxl does (online=0 + Closing, wait
for Closed, `block-xenblk remove`, remove both dirs). Refused disks must give hotplug-error with the
daemon's reason, a non-zero exit, and leave nothing behind once libxl cleaned up."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures.e2e import XENBLK, Stack, _wait, free_port, stop
from xenblk.xen.vdev import vdev_to_devid

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "contrib" / "xen" / "block-xenblk"


@dataclass
class Host:
    stack: Stack
    tmp: Path
    wrapper: Path  # what XENBLK points the hotplug script at: this checkout's xenblk on the sim host
    script: Path = SCRIPT
    # the script's own client (xenblk/hotplug_client.py, or this one) instead of `xenblk hotplug`
    client: Path | None = None

    def write_libxl_disk(self, domid: int, vdev: str, params: str, btype: str = "vbd3") -> str:
        """The nodes libxl writes for a disk with script=block-xenblk, in one transaction, state 1 last.
        Returns XENBUS_PATH as libxl passes it (relative to Dom0)."""
        devid = vdev_to_devid(vdev)
        b = f"/local/domain/0/backend/{btype}/{domid}/{devid}"
        f = f"/local/domain/{domid}/device/vbd/{devid}"
        backend = {
            "frontend": f, "params": params, "script": "/etc/xen/scripts/block-xenblk", "frontend-id": str(domid),
            "online": "1", "removable": "0", "bootable": "1", "state": "1", "dev": vdev,
            "type": "vbd3" if btype == "vbd3" else "phy", "mode": "w", "device-type": "disk",
            "discard-enable": "1", "specification": "xen",
        }  # fmt: skip
        frontend = {"backend": b, "backend-id": "0", "state": "1", "virtual-device": str(devid),
                    "device-type": "disk", "trusted": "1", "protocol": "x86_64-abi"}  # fmt: skip
        self.xs_batch(
            [("mkdir", f), ("chmod", f, f"n{domid}", "r0")]
            + [("write", f"{f}/{k}", v) for k, v in frontend.items()]
            + [("mkdir", b), ("chmod", b, "n0", f"r{domid}")]
            + [("write", f"{b}/{k}", v) for k, v in backend.items() if k != "state"]
            + [("write", f"{b}/state", "1")]
        )
        return f"backend/{btype}/{domid}/{devid}"

    def xs_batch(self, ops: list[tuple[str, ...]]) -> None:
        """Several xenstore operations in one transaction (as libxl's libxl__device_generic_add)."""
        code = (
            "import asyncio, json, sys\n"
            "from xenblk.xenstore import XenStore, Perm\n"
            "ops = json.loads(sys.argv[2])\n"
            "async def main():\n"
            "    async with XenStore.open(sys.argv[1]) as xs:\n"
            "        async def body(t):\n"
            "            for op, path, *rest in ops:\n"
            "                if op == 'mkdir': await t.mkdir(path)\n"
            "                elif op == 'write': await t.write(path, rest[0])\n"
            "                elif op == 'rm': await t.rm(path)\n"
            "                elif op == 'chmod': await t.set_perms(path, [Perm(p[0], int(p[1:])) for p in rest])\n"
            "        await xs.transact(body)\n"
            "asyncio.run(main())\n"
        )
        sock = str(self.stack.sim / "xenstored" / "socket")
        subprocess.run([XENBLK[0], "-c", code, sock, json.dumps(ops)], check=True, timeout=120, cwd=ROOT)

    def read(self, path: str) -> str | None:
        try:
            return self.stack.xenstore("read", path)
        except AssertionError:
            return None

    def wait_state(self, xenbus_path: str, want: str, timeout: float = 120) -> None:
        """As libxl's devstate wait (a failure bound only)."""
        path = f"/local/domain/0/{xenbus_path}/state"
        deadline = time.monotonic() + timeout
        while (got := self.read(path)) != want:
            assert time.monotonic() < deadline, f"{path} is {got}, not {want}\n{self.stack.log_tail()}"
            time.sleep(0.05)

    def hotplug(self, action: str, xenbus_path: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        # libxl's get_hotplug_env(); XENBLK points the script at this checkout on the sim host
        env = {**os.environ, "XENBUS_PATH": xenbus_path, "XENBUS_TYPE": xenbus_path.split("/")[1],
               "XENBUS_BASE_PATH": "backend", "script": "/etc/xen/scripts/block-xenblk",
               "XENBLK": str(self.wrapper)}  # fmt: skip
        if self.client is not None:  # as installed: python3 -I -S on the client, the daemon's config
            del env["XENBLK"]
            env |= {"XENBLK_HOTPLUG_CLIENT": str(self.client), "XENBLK_CONFIG": str(self.stack.config)}
        return subprocess.run([str(self.script), action], env=env, capture_output=True, text=True, timeout=timeout)

    def libxl_remove(self, xenbus_path: str, domid: int) -> subprocess.CompletedProcess[str]:
        """libxl__initiate_device_generic_remove, the remove script, libxl__device_destroy."""
        b = f"/local/domain/0/{xenbus_path}"
        ops: list[tuple[str, ...]] = [("write", f"{b}/online", "0")]
        if self.read(f"{b}/state") != "6":
            ops.append(("write", f"{b}/state", "5"))
        self.xs_batch(ops)
        self.wait_state(xenbus_path, "6")
        r = self.hotplug("remove", xenbus_path)
        devid = xenbus_path.rsplit("/", 1)[1]
        self.xs_batch([("rm", f"/local/domain/{domid}/device/vbd/{devid}"), ("rm", b)])
        return r

    def devices(self) -> list[dict]:  # type: ignore[type-arg]
        return list(json.loads(self.stack.xenblk("list", "--json", "--sim", str(self.stack.sim)).stdout))

    def served(self) -> list[dict]:  # type: ignore[type-arg]
        """What the daemon itself holds (control op list)."""
        from xenblk.backend import control
        from xenblk.config import load

        cfg = load(self.stack.config)
        return list(control.call(cfg.daemon.run_dir, {"op": "list"})["devices"])

    def open_fds_to(self, image: Path) -> list[str]:
        fd_dir = Path(f"/proc/{self.stack.serve.pid}/fd")
        out = []
        for fd in fd_dir.iterdir():
            try:
                if os.readlink(fd) == str(image):
                    out.append(fd.name)
            except OSError:
                pass
        return out

    def wait_gone(self, domid: int, timeout: float = 120) -> None:
        """The daemon forgets a device once libxl removed its dir (a failure bound only)."""
        deadline = time.monotonic() + timeout
        while any(d["domid"] == domid for d in self.served()):
            assert time.monotonic() < deadline, f"{self.served()}\n{self.stack.log_tail()}"
            time.sleep(0.05)


def start_serve(
    tmp: Path,
    sim: Path,
    cfg: Path,
    xenblk: list[str] = XENBLK,
    env: dict[str, str] | None = None,
    uevents: bool = False,
) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp / f"serve-{time.monotonic_ns()}.log"
    extra = [] if uevents else ["--no-uevents"]
    serve = subprocess.Popen([*xenblk, "--config", str(cfg), "serve", "--sim", str(sim), *extra],
                             stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=tmp, env=env)  # fmt: skip  # noqa: SIM115
    return serve, log


@contextlib.contextmanager
def running_host(
    tmp_path: Path,
    sim_dir: Path,
    xenblk: list[str] = XENBLK,
    env: dict[str, str] | None = None,
    script: Path = SCRIPT,
    uevents: bool = False,
    extra_config: str = "",
) -> Iterator[Host]:
    """A sim host (this checkout) with `xenblk serve` run as XENBLK (this checkout's or an installed one);
    extra_config: TOML appended to its config."""
    images = tmp_path / "images"
    (images / "qcow2").mkdir(parents=True)
    (images / "base").mkdir()
    port = free_port()
    cfg = tmp_path / "xenblk.toml"
    cfg.write_text(
        f'[daemon]\nbackend_types = ["vbd3", "vbd"]\nrun_dir = "{tmp_path}/run"\nstate_dir = "{tmp_path}/state"\n'
        f'[storage]\nallowed_dirs = ["{images}"]\nqcow2_dirs = ["{images}/qcow2"]\nbacking_dirs = ["{images}/base"]\n'
        f'[metrics]\nlisten = "127.0.0.1:{port}"\n[log]\nformat = "json"\nlevel = "debug"\n' + extra_config
    )
    wrapper = tmp_path / "xenblk-on-sim"
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in (env or {}).items() if k == "PYTHONPATH")
    wrapper.write_text(
        f'#!/bin/sh\n{exports}exec {shlex.join(xenblk)} --config {cfg} "$@" --sim {sim_dir}\n'
    )  # fmt: skip
    wrapper.chmod(0o755)
    hostp = subprocess.Popen([*XENBLK, "sim", "host", "--dir", str(sim_dir)], stdout=subprocess.DEVNULL,
                             stderr=open(tmp_path / "host.log", "wb"), cwd=ROOT)  # fmt: skip  # noqa: SIM115
    serve = None
    stack: Stack | None = None
    try:
        _wait(lambda: (sim_dir / "host.json").exists(), hostp, "xenblk sim host")
        serve, log = start_serve(tmp_path, sim_dir, cfg, xenblk, env, uevents)
        url = f"http://127.0.0.1:{port}/metrics"
        _wait(lambda: urllib.request.urlopen(url, timeout=2).read() is not None, serve, "xenblk serve")
        stack = Stack(sim=sim_dir, images=images, config=cfg, metrics_url=url, serve=serve, serve_log=log)
        yield Host(stack=stack, tmp=tmp_path, wrapper=wrapper, script=script)
    finally:
        stop(serve)
        if stack is not None:
            stop(stack.serve)  # a test may have restarted it
        stop(hostp)


@pytest.fixture
def host(tmp_path: Path, sim_dir: Path) -> Iterator[Host]:
    with running_host(tmp_path, sim_dir) as h:
        yield h


def verified_io(host: Host, domid: int) -> None:
    rc, result = host.stack.guest(domid, "--rw", "randrw", "--bs", "4k", "--iodepth", "8", "--size", "8M",
                                  "--verify", "--seed", "7")  # fmt: skip
    assert rc == 0, f"{result}\n{host.stack.log_tail()}"
    disks = result.get("disks") if isinstance(result, dict) else None
    assert disks, result
    for d in disks.values() if isinstance(disks, dict) else disks:
        assert d.get("errors", 0) == 0 and d.get("verify_errors", 0) == 0, d


def test_add_serves_the_disk_and_remove_releases_it(host: Host) -> None:
    image = host.stack.images / "a.raw"
    subprocess.run(["truncate", "-s", "32M", str(image)], check=True)
    xp = host.write_libxl_disk(3, "xvdb", f"aio:{image}")
    host.wait_state(xp, "2")  # libxl runs the script only after InitWait
    assert host.open_fds_to(image) == []  # not opened before the script asks
    r = host.hotplug("add", xp)
    assert r.returncode == 0, r.stderr + host.stack.log_tail()
    b = f"/local/domain/0/{xp}"
    assert host.read(f"{b}/hotplug-status") == "connected"
    assert host.read(f"{b}/hotplug-error") is None
    assert host.open_fds_to(image) != []
    verified_io(host, 3)
    r = host.libxl_remove(xp, 3)
    assert r.returncode == 0, r.stderr
    assert host.open_fds_to(image) == []  # released before remove returned
    host.wait_gone(3)
    assert host.read(b) is None and host.read(f"/local/domain/3/device/vbd/{vdev_to_devid('xvdb')}") is None


def test_qcow2_through_the_admin_rule_and_phy_backend_for_xen_417(host: Host) -> None:
    q = host.stack.images / "qcow2" / "q.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(q), "32M"], check=True)
    raw = host.stack.images / "p.raw"
    subprocess.run(["truncate", "-s", "32M", str(raw)], check=True)
    xq = host.write_libxl_disk(4, "xvdb", f"aio:{q}")  # xl can only say format=raw
    xp = host.write_libxl_disk(4, "xvdc", str(raw), btype="vbd")  # backendtype=phy: a bare path, type vbd
    for xpath in (xq, xp):
        host.wait_state(xpath, "2")
        r = host.hotplug("add", xpath)
        assert r.returncode == 0, r.stderr + host.stack.log_tail()
    formats = {(d["type"], d["vdev"]): d["format"] for d in host.served()}
    assert formats == {("vbd3", "xvdb"): "qcow2", ("vbd", "xvdc"): "raw"}
    verified_io(host, 4)
    for xpath in (xq, xp):
        assert host.libxl_remove(xpath, 4).returncode == 0
    host.wait_gone(4)
    chk = subprocess.run(["qemu-img", "check", str(q)], capture_output=True, text=True)
    assert chk.returncode == 0, chk.stdout + chk.stderr


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("missing", "No such file or directory"),
        ("outside", "outside storage.allowed_dirs"),
        ("vhd", "not a VHD image"),
        ("unknown", "unknown image format 'qed'"),
        ("qcow2-not-qcow2", "not a qcow2 image"),
    ],
)
def test_refused_disk_gives_hotplug_error_and_leaves_nothing(host: Host, case: str, reason: str) -> None:
    images = host.stack.images
    outside = host.tmp / "outside.raw"
    fake = images / "qcow2" / "raw-in-qcow2-dir.img"
    for p in (outside, fake, images / "a.vhd"):
        subprocess.run(["truncate", "-s", "8M", str(p)], check=True)
    params = {
        "missing": f"aio:{images}/nope.raw",
        "outside": f"aio:{outside}",
        "vhd": f"vhd:{images}/a.vhd",
        "unknown": f"qed:{images}/a.qed",
        "qcow2-not-qcow2": f"aio:{fake}",
    }[case]
    xp = host.write_libxl_disk(5, "xvdb", params)
    host.wait_state(xp, "2")
    r = host.hotplug("add", xp)
    assert r.returncode != 0
    assert reason in r.stderr, r.stderr  # what xl prints (libxl hands the script its stderr)
    b = f"/local/domain/0/{xp}"
    err = host.read(f"{b}/hotplug-error")
    assert err is not None and reason in err, err  # libxl logs "script: <hotplug-error>"
    assert host.read(f"{b}/hotplug-status") != "connected"
    assert host.libxl_remove(xp, 5).returncode == 0
    host.wait_gone(5)
    assert host.read(b) is None
    assert host.open_fds_to(outside) == [] and host.open_fds_to(fake) == []


def test_script_client_adds_refuses_and_removes(host: Host) -> None:
    """What block-xenblk runs when installed: xenblk/hotplug_client.py on python3 -I -S (stdlib only, a
    fast start within libxl's 40 s); the daemon writes hotplug-status / hotplug-error itself."""
    from xenblk import config, hotplug_client

    assert config.DaemonConfig().run_dir == hotplug_client.RUN_DIR
    host.client = ROOT / "xenblk" / "hotplug_client.py"
    image = host.stack.images / "a.raw"
    subprocess.run(["truncate", "-s", "32M", str(image)], check=True)
    good = host.write_libxl_disk(6, "xvdb", f"aio:{image}")
    bad = host.write_libxl_disk(7, "xvdb", f"aio:{host.stack.images}/nope.raw")
    for xp in (good, bad):
        host.wait_state(xp, "2")
    r = host.hotplug("add", good)
    assert r.returncode == 0, r.stderr + host.stack.log_tail()
    assert host.read(f"/local/domain/0/{good}/hotplug-status") == "connected"
    assert host.read(f"/local/domain/0/{good}/hotplug-error") is None
    assert host.open_fds_to(image) != []
    r = host.hotplug("add", bad)
    assert r.returncode == 1 and "No such file or directory" in r.stderr, r.stderr
    assert "No such file or directory" in (host.read(f"/local/domain/0/{bad}/hotplug-error") or "")
    assert host.read(f"/local/domain/0/{bad}/hotplug-status") != "connected"
    verified_io(host, 6)
    assert host.libxl_remove(bad, 7).returncode == 0
    assert host.libxl_remove(good, 6).returncode == 0
    assert host.open_fds_to(image) == []
    host.wait_gone(6)
    host.wait_gone(7)


def test_add_without_a_daemon_fails_at_once_with_the_reason(host: Host) -> None:
    image = host.stack.images / "a.raw"
    subprocess.run(["truncate", "-s", "8M", str(image)], check=True)
    assert stop(host.stack.serve) == 0
    xp = host.write_libxl_disk(6, "xvdb", f"aio:{image}")
    r = host.hotplug("add", xp, timeout=120)  # a failure bound: the refusal needs no waiting
    assert r.returncode != 0
    assert "xenblk serve is not running" in r.stderr, r.stderr
    assert "xenblk serve is not running" in (host.read(f"/local/domain/0/{xp}/hotplug-error") or "")
    # remove with no daemon: nothing is held, nothing to wait for
    assert host.hotplug("remove", xp, timeout=120).returncode == 0


def test_backend_type_not_served_is_named(host: Host) -> None:
    image = host.stack.images / "a.raw"
    subprocess.run(["truncate", "-s", "8M", str(image)], check=True)
    xp = host.write_libxl_disk(7, "xvdb", f"aio:{image}", btype="qdisk")
    r = host.hotplug("add", xp)
    assert r.returncode != 0 and "backend type qdisk is not served" in r.stderr, r.stderr
    host.xs_batch([("rm", f"/local/domain/0/{xp}"), ("rm", f"/local/domain/7/device/vbd/{vdev_to_devid('xvdb')}")])


def test_vbd_refused_while_xen_blkback_is_loaded(host: Host) -> None:
    """Backend type vbd is also the kernel's xen-blkback's: serving it next to a loaded blkback is refused.
    The simulated host's /sys is <sim dir>/sys; a loaded module is its /sys/module/<name> dir."""
    assert stop(host.stack.serve) == 0
    module = host.stack.sim / "sys" / "module" / "xen_blkback"
    module.mkdir(parents=True)
    cfg = host.tmp / "vbd.toml"
    cfg.write_text(
        f'[daemon]\nbackend_types = ["vbd3", "vbd"]\nrun_dir = "{host.tmp}/run"\nstate_dir = "{host.tmp}/state"\n'
        "[metrics]\nenabled = false\n"
    )
    serve, log = start_serve(host.tmp, host.stack.sim, cfg)
    assert serve.wait(timeout=60) == 1
    out = log.read_text()
    assert "xen-blkback is loaded" in out and "modprobe -r xen-blkback" in out, out
    # serving vbd3 only next to a loaded blkback is fine
    cfg.write_text(cfg.read_text().replace('backend_types = ["vbd3", "vbd"]', 'backend_types = ["vbd3"]'))
    serve, log = start_serve(host.tmp, host.stack.sim, cfg)
    try:
        deadline = time.monotonic() + 60
        while "daemon.ready" not in log.read_text():
            assert serve.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    finally:
        assert stop(serve) == 0


def test_a_script_that_only_writes_hotplug_status_still_gets_the_disk_served(host: Host) -> None:
    """A hotplug script of its own that only writes hotplug-status=connected (no `xenblk hotplug`) is taken
    as the go-ahead: the daemon opens the image then."""
    image = host.stack.images / "s.raw"
    subprocess.run(["truncate", "-s", "16M", str(image)], check=True)
    xp = host.write_libxl_disk(9, "xvdb", f"aio:{image}")
    host.wait_state(xp, "2")
    host.xs_batch([("write", f"/local/domain/0/{xp}/hotplug-status", "connected")])
    verified_io(host, 9)
    assert host.libxl_remove(xp, 9).returncode == 0
    assert host.open_fds_to(image) == []
    host.wait_gone(9)


def test_kill_9_restart_resumes_a_disk_added_through_the_script(host: Host) -> None:
    """A disk the script added (B/script, hotplug-status=connected) is resumed by a restarted daemon like
    any other: it must not wait for a second `take` (libxl runs the script once)."""
    image = host.stack.images / "k.raw"
    subprocess.run(["truncate", "-s", "32M", str(image)], check=True)
    xp = host.write_libxl_disk(10, "xvdb", f"aio:{image}")
    host.wait_state(xp, "2")
    assert host.hotplug("add", xp).returncode == 0
    guest = host.stack.guest_proc(10, "--rw", "randrw", "--bs", "4k", "--iodepth", "8", "--verify", "--seed", "5",
                                  "--until-stopped")  # fmt: skip
    try:
        host.wait_state(xp, "4")
        host.stack.wait_served(100, 10, "xvdb")
        host.stack.serve.kill()
        assert host.stack.serve.wait(timeout=120) == -9
        host.stack.serve, host.stack.serve_log = start_serve(host.tmp, host.stack.sim, host.stack.config)
        host.stack.wait_served(100, 10, "xvdb")  # the new daemon's own count: it serves the rings again
        guest.send_signal(signal.SIGTERM)
        out, err = guest.communicate(timeout=120)
    finally:
        if guest.poll() is None:
            guest.kill()
            guest.wait()
    assert guest.returncode == 0, f"{out}\n{err}\n{host.stack.log_tail()}"
    disks = json.loads(out)["disks"]
    for d in disks.values() if isinstance(disks, dict) else disks:
        assert d.get("errors", 0) == 0 and d.get("verify_errors", 0) == 0, d
    assert '"device.resumed"' in host.stack.serve_log.read_text()
    assert host.libxl_remove(xp, 10).returncode == 0
    host.wait_gone(10)


def test_vbd_left_to_xen_blkback_loaded_after_the_start(host: Host) -> None:
    """xen-blkback loaded while the daemon runs (udev loads it by its alias unless blacklisted): a new vbd
    device is the kernel's; xenblk writes nothing to it and the script says why."""
    module = host.stack.sim / "sys" / "module" / "xen_blkback"
    module.mkdir(parents=True)
    image = host.stack.images / "b.raw"
    subprocess.run(["truncate", "-s", "8M", str(image)], check=True)
    xp = host.write_libxl_disk(11, "xvdb", str(image), btype="vbd")
    r = host.hotplug("add", xp)
    assert r.returncode != 0 and "xen-blkback is loaded" in r.stderr, r.stderr
    assert host.read(f"/local/domain/0/{xp}/state") == "1"  # untouched: not InitWait, not Closed
    assert host.read(f"/local/domain/0/{xp}/max-ring-page-order") is None
    assert host.open_fds_to(image) == []
    assert not [d for d in host.served() if d["domid"] == 11]
    host.xs_batch([("rm", f"/local/domain/0/{xp}"), ("rm", f"/local/domain/11/device/vbd/{vdev_to_devid('xvdb')}")])


def test_add_of_an_image_another_disk_holds_succeeds_and_connects_once_released(host: Host) -> None:
    """A localhost migration as libxl runs it: the destination domain's disk is added while the source's
    disk (same daemon) holds the image. The script's add must succeed (libxl destroys the source only
    once the destination is complete), the destination waits for the image (docs: image ownership)
    and connects once the source is removed; its guest's I/O then verifies."""
    image = host.stack.images / "m.raw"
    subprocess.run(["truncate", "-s", "32M", str(image)], check=True)
    src = host.write_libxl_disk(3, "xvdb", f"aio:{image}")
    host.wait_state(src, "2")
    assert host.hotplug("add", src).returncode == 0
    dst = host.write_libxl_disk(4, "xvdb", f"aio:{image}")
    host.wait_state(dst, "2")
    r = host.hotplug("add", dst)
    assert r.returncode == 0, r.stderr + host.stack.log_tail()
    assert host.read(f"/local/domain/0/{dst}/hotplug-status") == "connected"
    (waiting,) = [d for d in host.served() if d["domid"] == 4]
    assert "in use" in (waiting["lock_wait"] or ""), waiting
    guest = host.stack.guest_proc(4, "--rw", "randrw", "--bs", "4k", "--iodepth", "8", "--size", "8M", "--verify",
                                  "--seed", "9", "--timeout", "120")  # fmt: skip
    try:
        fe = f"/local/domain/4/device/vbd/{vdev_to_devid('xvdb')}/state"
        deadline = time.monotonic() + 120
        while host.read(fe) != "3":  # the guest has granted its rings and waits for Connected
            assert guest.poll() is None and time.monotonic() < deadline, host.stack.log_tail()
            time.sleep(0.05)
        assert host.read(f"/local/domain/0/{dst}/state") == "2"  # not connected while the source holds it
        assert host.libxl_remove(src, 3).returncode == 0  # the source domain destroyed: the image released
        out, err = guest.communicate(timeout=120)
        assert guest.returncode == 0, out + err + host.stack.log_tail()
    finally:
        if guest.poll() is None:
            guest.kill()
            guest.communicate()
    assert host.libxl_remove(dst, 4).returncode == 0
