"""The simulated host's xenstored: the real daemon under the shim, started, stopped and restarted robustly."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from xenblk.sim.xenstored import SHIM_SOURCE, Xenstored, XenstoredError, find_xenstored, shim_library


def read(xsd: Xenstored, path: str) -> str:
    return subprocess.run(
        ["xenstore-read", path], env=xsd.env(), check=True, capture_output=True, text=True, timeout=30
    ).stdout.strip()


def test_started_daemon_answers_with_domain0(xenstored: Xenstored) -> None:
    assert xenstored.running
    assert read(xenstored, "/local/domain/0/name") == "Domain-0"
    assert read(xenstored, "/local/domain/0/domid") == "0"
    assert xenstored.trace_path.exists()


def test_restart_keeps_the_socket_path(xenstored: Xenstored) -> None:
    path, pid = xenstored.socket_path, xenstored.pid
    xenstored.restart()
    assert xenstored.socket_path == path and xenstored.pid != pid
    assert read(xenstored, "/local/domain/0/name") == "Domain-0"


def test_stop_is_idempotent_and_removes_the_socket(xenstored: Xenstored) -> None:
    pid = xenstored.pid
    assert pid is not None
    xenstored.stop()
    xenstored.stop()
    assert not xenstored.running and not xenstored.socket_path.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_stale_socket_from_a_dead_daemon_is_replaced(tmp_path: Path) -> None:
    d = tmp_path / "xsd"
    d.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(d / "socket"))
    stale.close()  # the file stays, nobody listens: what a killed xenstored leaves behind
    with Xenstored(d) as xsd:
        assert read(xsd, "/local/domain/0/name") == "Domain-0"


def test_refuses_to_start_over_a_live_daemon(xenstored: Xenstored) -> None:
    with pytest.raises(XenstoredError, match="already answers"):
        Xenstored(xenstored.directory).start()
    assert read(xenstored, "/local/domain/0/name") == "Domain-0"


def test_daemon_that_dies_at_start_is_reported_with_its_log(tmp_path: Path) -> None:
    fake = tmp_path / "fake-xenstored"
    fake.write_text("#!/bin/sh\necho 'FATAL: cannot open /dev/xen/evtchn' >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(XenstoredError) as e:
        Xenstored(tmp_path / "xsd", binary=fake).start()
    assert "exited with status 3" in str(e.value)
    assert "FATAL: cannot open /dev/xen/evtchn" in str(e.value)


def test_daemon_that_never_answers_times_out_and_is_stopped(tmp_path: Path) -> None:
    fake = tmp_path / "fake-xenstored"
    fake.write_text("#!/bin/sh\necho started >&2\nexec sleep 60\n")
    fake.chmod(0o755)
    xsd = Xenstored(tmp_path / "xsd", binary=fake, start_timeout=0.5)
    with pytest.raises(XenstoredError, match="did not answer") as e:
        xsd.start()
    assert "started" in str(e.value)
    assert not xsd.running


def test_missing_binary_says_which_package(tmp_path: Path) -> None:
    with pytest.raises(XenstoredError, match=r"xen-utils-<version>"):
        Xenstored(tmp_path, binary=tmp_path / "nope").start()


def test_newest_installed_xen_is_chosen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Debian 12 has /usr/lib/xen-4.17, Debian 13 /usr/lib/xen-4.20; a left-over older tree must not win,
    # and 4.20 sorts after 4.9 as a version, not as text.
    monkeypatch.delenv("XENBLK_XENSTORED", raising=False)
    for v in ("4.9", "4.20", "4.17", "common"):
        (tmp_path / f"xen-{v}" / "bin").mkdir(parents=True)
        (tmp_path / f"xen-{v}" / "bin" / "xenstored").touch()
    assert find_xenstored(tmp_path) == tmp_path / "xen-4.20" / "bin" / "xenstored"
    monkeypatch.setenv("XENBLK_XENSTORED", "/opt/xs")
    assert find_xenstored(tmp_path) == Path("/opt/xs")


def test_socket_path_too_long_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(XenstoredError, match="too long"):
        Xenstored(tmp_path / ("d" * 120)).start()


def test_shim_is_rebuilt_only_when_its_source_is_newer(tmp_path: Path) -> None:
    src = tmp_path / "xsshim.c"
    shutil.copy(SHIM_SOURCE, src)
    lib = shim_library(src, tmp_path / "build")
    first = lib.stat()
    assert shim_library(src, tmp_path / "build").stat().st_ino == first.st_ino
    os.utime(src, (first.st_mtime + 10, first.st_mtime + 10))
    assert shim_library(src, tmp_path / "build").stat().st_ino != first.st_ino
    assert [p.name for p in (tmp_path / "build").iterdir()] == ["xsshim.so"]


def test_shim_build_failure_is_reported(tmp_path: Path) -> None:
    src = tmp_path / "xsshim.c"
    src.write_text("this is not C\n")
    with pytest.raises(XenstoredError, match="building the xenstored shim failed"):
        shim_library(src, tmp_path / "build")
    assert list((tmp_path / "build").iterdir()) == []


def test_unremovable_socket_path_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "xsd" / "socket").mkdir(parents=True)
    with pytest.raises(XenstoredError, match="cannot remove stale"):
        Xenstored(tmp_path / "xsd").start()
