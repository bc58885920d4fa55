"""`xenblk sim host`: the simulated Xen host, i.e. the real xenstored under the shim plus the grant/event broker.

Layout of DIR (docs/DESIGN.md, "Simulated host"): `xenstored/` (its socket is the XENSTORED_PATH),
`broker.sock`, and `host.json`, which appears only once both answer and goes away on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
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


class SimHost:
    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory).resolve()
        self.host_json = self.directory / "host.json"
        self.broker_path = self.directory / "broker.sock"
        longest = self.directory / _LONGEST_SOCKET
        if len(os.fsencode(longest)) >= SUN_PATH_MAX:
            raise XenblkError(
                f"sim dir {self.directory} is too long: {longest} must stay under {SUN_PATH_MAX} bytes "
                "for a unix socket; use a shorter --dir"
            )
        self.xenstored = Xenstored(self.directory / "xenstored")
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
            self._refuse_if_running()
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
        if isinstance(xsd_pid, int) and _is_xenstored(xsd_pid, self.xenstored.socket_path.parent):
            log.warning("stopping the xenstored left by a killed sim host", pid=xsd_pid)
            os.kill(xsd_pid, signal.SIGKILL)
            for _ in range(100):
                if not _alive(xsd_pid):
                    break
                time.sleep(0.02)
        self.host_json.unlink()

    async def stop(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.host_json.unlink()
        await self.broker.close()
        self.xenstored.stop()


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
