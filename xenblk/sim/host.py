"""`xenblk sim host`: the simulated Xen host, i.e. the real xenstored under the shim plus the grant/event broker.

Layout of DIR (docs/DESIGN.md, "Simulated host"): `xenstored/` (its socket is the XENSTORED_PATH),
`broker.sock`, and `host.json`, which appears only once both answer and goes away on shutdown.
When DIR is too deep for unix socket paths, `xenstored/` and `broker.sock` go to a short
directory under /tmp (DIR/xenstored links to it) that is removed on shutdown; host.json names them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog

from xenblk.errors import XenblkError
from xenblk.sim.broker import SUN_PATH_MAX, Broker
from xenblk.sim.xenstored import Xenstored

log = structlog.get_logger(__name__)

# Both sockets must fit sockaddr_un.sun_path; "xenstored/socket" is the longer of the two names.
_LONGEST_SOCKET = "xenstored/socket"
_SHORT_BASE = "/tmp"


class SimHost:
    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory).resolve()
        self.host_json = self.directory / "host.json"
        # Sockets live in DIR when their paths fit sockaddr_un; otherwise in a short directory of
        # their own under /tmp, linked from DIR/xenstored (clients take the paths from host.json).
        self.socket_home = self.directory
        self._short_home: Path | None = None
        if len(os.fsencode(self.directory / _LONGEST_SOCKET)) >= SUN_PATH_MAX:
            self._short_home = Path(tempfile.mkdtemp(prefix="xbsim-", dir=_SHORT_BASE))
            self.socket_home = self._short_home
        self.broker_path = self.socket_home / "broker.sock"
        self.xenstored = Xenstored(self.socket_home / "xenstored")
        self.broker = Broker(self.broker_path, self.xenstored.socket_path)

    def description(self) -> dict[str, Any]:
        return {
            "xenstored_path": str(self.xenstored.socket_path),
            "broker": str(self.broker_path),
            "pid": os.getpid(),
            "xenstored_pid": self.xenstored.pid,
        }

    async def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.host_json.exists():
            try:
                self._refuse_if_running()
            except BaseException:
                self._remove_short_home()
                raise
        if self._short_home is not None:
            log.info("sim dir too long for unix sockets; sockets are elsewhere", dir=str(self._short_home))
            link = self.directory / "xenstored"
            if link.is_symlink():
                link.unlink()
            if not link.exists():
                link.symlink_to(self._short_home / "xenstored", target_is_directory=True)
        await asyncio.get_running_loop().run_in_executor(None, self.xenstored.start)
        try:
            await self.broker.start()
            tmp = self.host_json.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.description()) + "\n")
            os.replace(tmp, self.host_json)
        except BaseException:
            await self.stop()
            raise

    def _refuse_if_running(self) -> None:
        try:
            info = json.loads(self.host_json.read_text())
            pid = int(info["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        if _alive(pid):
            raise XenblkError(f"a sim host (pid {pid}) already runs in {self.directory}; stop it first")
        # A host killed hard leaves its xenstored (own session) running on our socket: end it.
        xsd_pid = info.get("xenstored_pid")
        rundir = Path(str(info.get("xenstored_path", ""))).parent
        if isinstance(xsd_pid, int) and _is_xenstored(xsd_pid, rundir):
            log.warning("stopping the xenstored left by a killed sim host", pid=xsd_pid)
            os.kill(xsd_pid, signal.SIGKILL)
            # gone in milliseconds when idle; the bound is for a loaded machine, not a guess at "long enough"
            deadline = time.monotonic() + 30
            while _alive(xsd_pid) and time.monotonic() < deadline:
                time.sleep(0.02)
        old_home = rundir.parent
        if old_home.parent == Path(_SHORT_BASE) and old_home.name.startswith("xbsim-") and old_home != self.socket_home:
            shutil.rmtree(old_home, ignore_errors=True)  # the killed host's short socket directory
        self.host_json.unlink()

    async def stop(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.host_json.unlink()
        await self.broker.close()
        self.xenstored.stop()
        if self._short_home is not None:
            link = self.directory / "xenstored"
            if link.is_symlink():
                link.unlink()
        self._remove_short_home()

    def _remove_short_home(self) -> None:
        if self._short_home is not None:
            shutil.rmtree(self._short_home, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is not alive; it only waits for its (killed) parent's reaper.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _is_xenstored(pid: int, rundir: Path) -> bool:
    """Is `pid` a xenstored whose run directory is `rundir` (so not some unrelated reuse of the pid)?"""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().split(b"\0")[0]
    except OSError:
        return False
    return cmd.endswith(b"xenstored") and b"XENSTORED_RUNDIR=" + os.fsencode(rundir) in env


async def run_host(directory: Path | str, *, quiet: bool = False) -> None:
    """Run the simulated host until SIGTERM or SIGINT."""
    host = SimHost(directory)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await host.start()
    try:
        log.info("sim host ready", **host.description())
        if not quiet:
            print(f"XENSTORED_PATH={host.xenstored.socket_path}", flush=True)
        await stopping.wait()
    finally:
        await host.stop()
        log.info("sim host stopped", dir=str(host.directory))
