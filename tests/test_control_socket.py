"""The daemon's control socket where `daemon.run_dir` is deeper than a unix socket address holds
(108 bytes): served and reached through the CLI all the same, 0600, one daemon per socket."""

from __future__ import annotations

import asyncio
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from xenblk.backend.control import ControlServer, DaemonNotRunning, call, socket_path
from xenblk.errors import XenblkError


def deep_dir(tmp_path: Path) -> Path:
    d = tmp_path.joinpath(*(["a-rather-long-directory-name"] * 6), "run")
    assert len(str(socket_path(str(d)))) > 108
    return d


async def resize_handler(req: dict[str, Any]) -> dict[str, Any]:
    if req.get("op") != "resize":
        return {"ok": False, "error": f"unknown op {req.get('op')}"}
    return {"ok": True, "old_sectors": 8, "sectors": 16 + int(req["domid"]), "changed": True}


async def test_deep_run_dir_serves_the_cli(tmp_path: Path) -> None:
    run_dir = deep_dir(tmp_path)
    cfg = tmp_path / "xenblk.toml"
    cfg.write_text(f'[daemon]\nrun_dir = "{run_dir}"\n')
    server = ControlServer(socket_path(str(run_dir)), resize_handler)
    await server.start()
    try:
        sock = socket_path(str(run_dir))
        assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
        # The real CLI, in another process, connects through the same long path.
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "xenblk", "--config", str(cfg), "resize", "3", "xvdb",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        assert out.decode().strip() == "xvdb of domain 3: 8 -> 19 sectors"
        # A second daemon with the same run_dir is refused: the first one answers.
        with pytest.raises(XenblkError, match="another xenblk serve is running"):
            await ControlServer(sock, resize_handler).start()
    finally:
        await server.close()
    assert not socket_path(str(run_dir)).exists()
    with pytest.raises(DaemonNotRunning):
        await asyncio.to_thread(call, str(run_dir), {"op": "list"})


def test_missing_deep_run_dir_means_not_running(tmp_path: Path) -> None:
    with pytest.raises(DaemonNotRunning):
        call(str(deep_dir(tmp_path)), {"op": "list"})
