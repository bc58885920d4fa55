"""systemd/xenblk.service passes `systemd-analyze verify`, and `xenblk serve` speaks the notify
protocol the unit relies on (READY=1 once the watches are live, WATCHDOG=1, STOPPING=1)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.sim import SimHostProc
from tests.fixtures.wait import GENEROUS

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "xenblk.service"
INSTALLED = "/usr/local/bin/xenblk"
XENBLK = [sys.executable, "-m", "xenblk"]


def _directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)


def test_unit_verifies_with_the_entry_point_installed(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze missing (Debian package systemd)")
    text = UNIT.read_text()
    d = _directives(text)
    assert d["ExecStart"] == [f"{INSTALLED} serve"]
    # verify needs ExecStart's binary to exist: point it at this checkout's entry point, nothing else changes.
    entry = Path(sys.executable).parent / "xenblk"
    assert entry.exists(), f"{entry} missing: `make setup` installs the package into .venv"
    unit = tmp_path / "xenblk.service"
    unit.write_text(text.replace(f"ExecStart={INSTALLED} ", f"ExecStart={entry} "))
    assert [a for a in unit.read_text().splitlines() if a not in text.splitlines()] == [f"ExecStart={entry} serve"]
    r = _verify(unit)
    complaints = [line for line in (r.stdout + r.stderr).splitlines() if "xenblk.service" in line]
    assert r.returncode == 0 and not complaints, r.stdout + r.stderr


def test_unit_as_shipped_only_lacks_the_installed_binary(tmp_path: Path) -> None:
    if os.path.exists(INSTALLED):
        r = _verify(UNIT)
        assert r.returncode == 0, r.stderr
        return
    unit = tmp_path / "xenblk.service"
    shutil.copy(UNIT, unit)
    r = _verify(unit)
    complaints = [line for line in (r.stdout + r.stderr).splitlines() if "xenblk.service" in line]
    assert complaints == [f"xenblk.service: Command {INSTALLED} is not executable: No such file or directory"]


def test_unit_has_the_lifecycle_and_sandbox_it_promises() -> None:
    d = _directives(UNIT.read_text())
    assert d["Type"] == ["notify"] and d["Restart"] == ["on-failure"]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert "xenstored.service" in d["After"][0] and d["Wants"] == ["xenstored.service"]
    assert int(d["WatchdogSec"][0]) > 0
    assert d["ProtectSystem"] == ["strict"] and d["NoNewPrivileges"] == ["yes"] and d["PrivateTmp"] == ["yes"]
    assert d["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6 AF_NETLINK"]
    assert {"/dev/xen/gntdev rw", "/dev/xen/evtchn rw", "block-device-mapper rw"} <= set(d["DeviceAllow"])
    assert d["DevicePolicy"] == ["closed"]


def test_serve_notifies_ready_watchdog_and_stopping(sim_host: SimHostProc, tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    if len(os.fsencode(sock_path)) >= 108:
        sock_path = Path(f"/tmp/xenblk-notify-{os.getpid()}.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(sock_path))
    listener.settimeout(GENEROUS)
    cfg = tmp_path / "xenblk.toml"
    cfg.write_text(f'[daemon]\nrun_dir = "{tmp_path}/run"\n[metrics]\nenabled = false\n')
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"}
    env.pop("WATCHDOG_PID", None)
    serve = subprocess.Popen([*XENBLK, "--config", str(cfg), "serve", "--sim", str(sim_host.dir), "--no-uevents"],
                             env=env, stderr=open(tmp_path / "serve.log", "wb"))  # fmt: skip  # noqa: SIM115
    try:
        messages: list[str] = []
        deadline = time.monotonic() + GENEROUS
        while not {"READY=1", "WATCHDOG=1"} <= {m for msg in messages for m in msg.split("\n")}:
            assert time.monotonic() < deadline, messages
            messages.append(listener.recv(4096).decode())
        assert messages[0].startswith("READY=1"), messages
        # READY came after the watch went live: the control socket answers and the watch serves devices.
        assert (tmp_path / "run" / "control.sock").exists()
        serve.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in messages[-1]:
            messages.append(listener.recv(4096).decode())
        assert serve.wait(timeout=GENEROUS) == 0
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
        listener.close()
        sock_path.unlink(missing_ok=True)
