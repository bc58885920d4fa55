"""The operator's commands on the simulated host: `xenblk attach` writes what libxl writes
(checked with xenstore-ls -p, permissions included), `--wait` reports the backend's error,
`detach`, `list`, config errors, and `serve` reloading its config on SIGHUP."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.fixtures.e2e import free_port
from tests.fixtures.sim import SimHostProc
from tests.fixtures.wait import GENEROUS

XENBLK = [sys.executable, "-m", "xenblk"]


def run(cfg: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([*XENBLK, "--config", str(cfg), *args], capture_output=True, text=True, timeout=120)
    if check and r.returncode != 0:
        raise AssertionError(f"xenblk {' '.join(args)} -> {r.returncode}\n{r.stdout}{r.stderr}")
    return r


def ls(host: SimHostProc, path: str) -> list[str]:
    r = subprocess.run(["xenstore-ls", "-p", path], capture_output=True, text=True, env=host.env(), check=True)
    # "  key = "value" . . . .  (n0,r1)" -> "key=value (n0,r1)", indentation kept
    out = []
    for line in r.stdout.splitlines():
        m = re.fullmatch(r'(\s*)(\S+) = "(.*?)"[ .]*\((.*)\)', line)
        assert m, line
        out.append(f"{m.group(1)}{m.group(2)}={m.group(3)} ({m.group(4)})")
    return out


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    p = tmp_path / "xenblk.toml"
    p.write_text(
        f'[daemon]\nrun_dir = "{tmp_path}/run"\n[storage]\nallowed_dirs = ["{images}"]\n'
        f'[metrics]\nlisten = "127.0.0.1:{free_port()}"\n'
    )
    return p


def test_attach_writes_the_nodes_and_permissions_libxl_writes(sim_host: SimHostProc, cfg: Path) -> None:
    # a short path: xenstore-ls cuts values at 80 columns
    short = Path(tempfile.mkdtemp(prefix="xb-"))
    img = short / "a.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "16M"], check=True)
    r = run(cfg, "attach", "7", f"qcow2:{img}", "--vdev", "xvdc", "--mode", "r", "--sim", str(sim_host.dir))
    assert "attached" in r.stdout
    assert ls(sim_host, "/local/domain/0/backend/vbd3/7") == [
        "51744= (n0,r7)",
        " frontend=/local/domain/7/device/vbd/51744 (n0,r7)",
        " frontend-id=7 (n0,r7)",
        " online=1 (n0,r7)",
        " removable=0 (n0,r7)",
        " bootable=1 (n0,r7)",
        " dev=xvdc (n0,r7)",
        " mode=r (n0,r7)",
        " device-type=disk (n0,r7)",
        " type=vbd3 (n0,r7)",
        f" params=qcow2:{img} (n0,r7)",
        " state=1 (n0,r7)",
    ]
    assert ls(sim_host, "/local/domain/7/device/vbd") == [
        "51744= (n7,r0)",
        " backend=/local/domain/0/backend/vbd3/7/51744 (n7,r0)",
        " backend-id=0 (n7,r0)",
        " virtual-device=51744 (n7,r0)",
        " device-type=disk (n7,r0)",
        " state=1 (n7,r0)",
    ]
    # the simulated domain was created first, as a toolstack's domain exists before its disks
    assert "7= (n7,r0)" in ls(sim_host, "/local/domain")
    rows = json.loads(run(cfg, "list", "--json", "--sim", str(sim_host.dir)).stdout)
    assert [(r["domid"], r["vdev"], r["format"], r["image"], r["state"], r["mode"]) for r in rows] == [
        (7, "xvdc", "qcow2", str(img), 1, "r")
    ]
    again = run(cfg, "attach", "7", str(img), "--vdev", "xvdc", "--sim", str(sim_host.dir), check=False)
    assert again.returncode == 1 and "already has xvdc" in again.stderr
    run(cfg, "detach", "7", "xvdc", "--force", "--sim", str(sim_host.dir))
    assert json.loads(run(cfg, "list", "--json", "--sim", str(sim_host.dir)).stdout) == []
    shutil.rmtree(short)


def test_attach_cdrom_and_relative_path(sim_host: SimHostProc, cfg: Path) -> None:
    (cfg.parent / "images" / "cd.iso").write_bytes(b"\0" * 4096)
    r = subprocess.run(
        [*XENBLK, "--config", str(cfg), "attach", "2", "images/cd.iso", "--cdrom", "--vdev", "xvdd",
         "--sim", str(sim_host.dir)], capture_output=True, text=True, cwd=cfg.parent, check=True,
    )  # fmt: skip
    assert r.returncode == 0
    b = ls(sim_host, "/local/domain/0/backend/vbd3/2/51760")
    assert "device-type=cdrom (n0,r2)" in b
    params = subprocess.run(["xenstore-read", "/local/domain/0/backend/vbd3/2/51760/params"], env=sim_host.env(),
                            capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert params == f"{cfg.parent}/images/cd.iso"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--vdev", "xvdb1"], "is a partition"),
        (["--vdev", "sda"], "bad virtual device name"),
        (["--format", "qcow2", "raw:/x.raw"], "says format raw but --format is qcow2"),
    ],
)
def test_attach_refuses_bad_arguments(sim_host: SimHostProc, cfg: Path, args: list[str], message: str) -> None:
    image = [] if args[-1].startswith("raw:") else ["/x.raw"]
    r = run(cfg, "attach", "1", *image, *args, "--sim", str(sim_host.dir), check=False)
    assert r.returncode == 1 and message in r.stderr, r.stderr
    nothing = subprocess.run(["xenstore-ls", "/local/domain/0/backend"], env=sim_host.env(), capture_output=True)
    assert nothing.returncode != 0  # nothing was written


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[daemon]\nbackend_typez = ["vbd3"]\n')
    r = run(bad, "serve", check=False)
    assert r.returncode == 1 and "daemon.backend_typez" in r.stderr
    bad.write_text('[metrics]\nlisten = "nowhere"\n')
    r = run(bad, "list", check=False)
    assert r.returncode == 1 and "metrics.listen" in r.stderr
    r = run(tmp_path / "missing.toml", "list", check=False)
    assert r.returncode == 1 and "does not exist" in r.stderr
    r = run(tmp_path / "missing.toml", "serve", "--sim", str(tmp_path / "nosim"), check=False)
    assert r.returncode == 1


def test_commands_without_a_daemon_or_host_fail_clearly(tmp_path: Path, cfg: Path) -> None:
    r = run(cfg, "resize", "1", "xvdb", check=False)
    assert r.returncode == 1 and "xenblk serve is not running" in r.stderr
    r = run(cfg, "attach", "1", "/x.raw", "--sim", str(tmp_path / "nosim"), check=False)
    assert r.returncode == 1 and "no simulated host" in r.stderr


def test_every_command_has_help() -> None:
    for cmd in ("serve", "attach", "detach", "list", "resize", "stats"):
        r = subprocess.run([*XENBLK, cmd, "--help"], capture_output=True, text=True, check=True)
        assert "usage: xenblk " + cmd in r.stdout
        assert cmd == "stats" or "--sim" in r.stdout


def _wait(pred, what: str, timeout: float = GENEROUS) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).read()
        return True
    except OSError:
        return False


def test_serve_with_wait_errors_and_sighup_reload(sim_host: SimHostProc, cfg: Path, tmp_path: Path) -> None:
    port1 = int(cfg.read_text().split("127.0.0.1:")[1].split('"')[0])
    log = tmp_path / "serve.log"
    serve = subprocess.Popen([*XENBLK, "--config", str(cfg), "serve", "--sim", str(sim_host.dir)],
                             stderr=open(log, "wb"))  # fmt: skip  # noqa: SIM115
    try:
        _wait(lambda: _answers(f"http://127.0.0.1:{port1}/metrics"), "metrics")
        # --wait reports the daemon's error node and exits 1
        r = run(cfg, "attach", "1", "/etc/passwd", "--wait", "--timeout", "20", "--sim", str(sim_host.dir), check=False)
        assert r.returncode == 1 and "outside storage.allowed_dirs" in r.stderr, r.stderr
        img = cfg.parent / "images" / "ok.raw"
        img.write_bytes(b"\0" * (1 << 20))
        run(cfg, "attach", "1", str(img), "--vdev", "xvdc", "--wait=initwait", "--sim", str(sim_host.dir))
        img2 = cfg.parent / "images" / "ok2.raw"  # its own: xvdc holds ok.raw read-write (image lock)
        img2.write_bytes(b"\0" * (1 << 20))
        r = run(cfg, "attach", "1", str(img2), "--vdev", "xvdd", "--wait", "--timeout", "1", "--sim", str(sim_host.dir),
                check=False)  # fmt: skip
        assert r.returncode == 1 and "backend state is InitWait after 1s" in r.stderr  # no guest: never Connected
        text = run(cfg, "list", "--sim", str(sim_host.dir)).stdout
        assert re.search(r"1 xvdb\s+Closed!", text) and "error: image /etc/passwd is outside" in text, text
        # SIGHUP: the metrics endpoint moves to the new address; an invalid config is ignored
        port2 = free_port()
        cfg.write_text(cfg.read_text().replace(f"127.0.0.1:{port1}", f"127.0.0.1:{port2}"))
        serve.send_signal(signal.SIGHUP)
        _wait(lambda: _answers(f"http://127.0.0.1:{port2}/metrics"), "metrics on the new port")
        assert not _answers(f"http://127.0.0.1:{port1}/metrics")
        cfg.write_text(cfg.read_text() + "[bogus]\n")
        serve.send_signal(signal.SIGHUP)
        _wait(lambda: "daemon.reload_failed" in log.read_text(), "reload failure logged")
        assert serve.poll() is None and _answers(f"http://127.0.0.1:{port2}/metrics")
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=GENEROUS) == 0
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
    assert os.path.exists(sim_host.dir / "host.json")
