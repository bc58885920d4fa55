"""Child processes for the benchmark: each in its own process group, stopped (and
killed if need be) on the way out, plus what /proc says about a process's CPU and memory."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


class BenchError(RuntimeError):
    """A step of the benchmark failed; the message says which and why."""


class Proc:
    """A long-running child in its own session (so its whole process group can be signalled)."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log = log
        self._logf: IO[bytes] = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=self._logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            raise BenchError(f"{self.name} exited with status {self.popen.returncode}; log:\n{self.tail()}")

    def tail(self, lines: int = 25) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the process group, then SIGKILL if it does not go within `timeout`."""
        try:
            if self.alive():
                _signal_group(self.pid, signal.SIGTERM)
                try:
                    self.popen.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    _signal_group(self.pid, signal.SIGKILL)
                    self.popen.wait(timeout=5)
            # Stragglers left in the group (children of the child) go too.
            _signal_group(self.pid, signal.SIGKILL)
        finally:
            self._logf.close()


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def run(argv: Sequence[str], timeout: float, what: str, env: dict[str, str] | None = None) -> str:
    """Run a short command in its own process group; its stdout, or BenchError with its stderr."""
    p = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=env,
    )
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _signal_group(p.pid, signal.SIGKILL)
        p.communicate()
        raise BenchError(f"{what}: timed out after {timeout:.0f}s") from None
    except BaseException:
        _signal_group(p.pid, signal.SIGKILL)
        p.wait()
        raise
    if p.returncode != 0:
        raise BenchError(f"{what}: exit status {p.returncode}\n{(err or out).strip()[-3000:]}")
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (every thread), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state): utime is field 14, stime field 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def group_cpu_seconds(pgid: int) -> float:
    """utime + stime of every live process in process group `pgid` (e.g. the sim host and its xenstored)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid:  # field 5: pgrp
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def rss_bytes(pid: int) -> int:
    """Resident set size (VmRSS) in bytes."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def pss_bytes(pid: int) -> int | None:
    """Proportional set size from smaps_rollup (shared pages counted by share), or None."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def wait_until(pred: object, timeout: float, what: str, procs: Sequence[Proc] = (), interval: float = 0.05) -> float:
    """Poll `pred()` until true; seconds waited. BenchError on timeout or if one of `procs` died."""
    t0 = time.monotonic()
    while True:
        if pred():  # type: ignore[operator]
            return time.monotonic() - t0
        for p in procs:
            p.check_alive()
        if time.monotonic() - t0 > timeout:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
