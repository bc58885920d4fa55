"""Run Debian's real C xenstored (Xen 4.17 on Debian 12, 4.20 on Debian 13) without a hypervisor, under the
LD_PRELOAD shim (native/xsshim).

One instance owns one directory: `socket` (the XENSTORED_PATH), `trace.log`, `xenstored.log` and the
shim's fake /proc/xen files in `fakexen/`. Start-up is synchronous and short; it returns once the
socket answers a request and Domain-0's name/domid nodes exist.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from xenblk.errors import XenblkError
from xenblk.xenstore import wire
from xenblk.xenstore.errors import ProtocolError

XEN_LIB = Path("/usr/lib")


def find_xenstored(lib: Path = XEN_LIB) -> Path:
    """The C xenstored of the newest installed Xen: Debian ships it as /usr/lib/xen-<version>/bin/xenstored
    (/usr/sbin/xenstored is a wrapper that asks the running hypervisor, which the simulated host has not).
    $XENBLK_XENSTORED overrides; with none installed, a placeholder path that start() reports as missing."""
    override = os.environ.get("XENBLK_XENSTORED")
    if override:
        return Path(override)
    found = [p for p in lib.glob("xen-*/bin/xenstored") if _version(p.parents[1].name) is not None]
    if not found:
        return lib / "xen-<version>" / "bin" / "xenstored"
    return max(found, key=lambda p: _version(p.parents[1].name) or ())


def _version(dirname: str) -> tuple[int, ...] | None:
    try:
        return tuple(int(x) for x in dirname.removeprefix("xen-").split("."))
    except ValueError:
        return None


XENSTORED_BIN = find_xenstored()
REPO_ROOT = Path(__file__).resolve().parents[2]
SHIM_SOURCE = REPO_ROOT / "native" / "xsshim" / "xsshim.c"

SUN_PATH_MAX = 108  # sizeof(sockaddr_un.sun_path), NUL included

_running: set[Xenstored] = set()


class XenstoredError(XenblkError):
    pass


def shim_library(source: Path = SHIM_SOURCE, build_dir: Path | None = None) -> Path:
    """The compiled shim, rebuilt only when the source is newer. Safe against concurrent builders."""
    if not source.is_file():
        raise XenstoredError(f"xenstored shim source not found at {source}")
    out_dir = build_dir or _default_build_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / "xsshim.so"
    if lib.exists() and lib.stat().st_mtime >= source.stat().st_mtime:
        return lib
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise XenstoredError("cannot build the xenstored shim: no gcc (apt-get install build-essential)")
    # Build to a private name, then rename: another process may be loading the old library right now.
    fd, tmp = tempfile.mkstemp(prefix=".xsshim.", suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        proc = subprocess.run(
            [gcc, "-shared", "-fPIC", "-O2", "-o", tmp, str(source), "-ldl"], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise XenstoredError(f"building the xenstored shim failed (libxen-dev installed?): {proc.stderr.strip()}")
        os.replace(tmp, lib)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return lib


def _default_build_dir() -> Path:
    repo_build = REPO_ROOT / "build"
    if os.access(REPO_ROOT, os.W_OK):
        return repo_build / "xsshim"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "xenblk" / "xsshim"


def request(socket_path: Path | str, op: wire.Op, payload: bytes, timeout: float = 2.0) -> tuple[int, bytes]:
    """One blocking request on a fresh connection: (reply type, payload). For set-up code, not the daemon."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(socket_path))
        s.sendall(wire.encode(op, 1, 0, payload))
        header = wire.decode_header(_recv_exactly(s, wire.HEADER.size))
        return header.type, _recv_exactly(s, header.length)


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionResetError("xenstored closed the connection")
        buf += chunk
    return buf


class Xenstored:
    def __init__(
        self,
        directory: Path | str,
        *,
        binary: Path | str = XENSTORED_BIN,
        shim: Path | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        self.directory = Path(directory).resolve()
        self.binary = Path(binary)
        self._shim = shim
        self.start_timeout = start_timeout
        self.socket_path = self.directory / "socket"
        self.trace_path = self.directory / "trace.log"
        self.log_path = self.directory / "xenstored.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def env(self) -> dict[str, str]:
        """The environment for xenstore-* CLI tools (and anything else) to reach this xenstored."""
        return {**os.environ, "XENSTORED_PATH": str(self.socket_path)}

    def start(self) -> None:
        if self.running:
            raise XenstoredError(f"xenstored in {self.directory} is already running (pid {self.pid})")
        if not self.binary.is_file():
            raise XenstoredError(f"{self.binary} not found: install xen-utils-<version> (scripts/setup.sh does)")
        if len(os.fsencode(self.socket_path)) >= SUN_PATH_MAX:
            raise XenstoredError(f"socket path {self.socket_path} is too long for a unix socket; use a shorter dir")
        shim = self._shim or shim_library()
        fake = self.directory / "fakexen"
        fake.mkdir(parents=True, exist_ok=True)
        # No trailing newline: xenstored parses the port strictly.
        (fake / "xsd_port").write_text("1")
        with open(fake / "xsd_kva", "wb") as f:
            f.truncate(4096)
        self._clear_stale_socket()
        env = {
            **os.environ,
            "XSSHIM_DIR": str(fake),
            "XENSTORED_RUNDIR": str(self.directory),
            "LD_PRELOAD": str(shim),
        }
        env.pop("XENSTORED_PATH", None)
        # -N: stay in the foreground so we own the pid; never -D, which crashes 4.17 on the first request.
        cmd = [str(self.binary), "-N", "-T", str(self.trace_path)]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        _running.add(self)
        try:
            self._wait_ready()
            self._write(b"/local/domain/0/name\0Domain-0")
            self._write(b"/local/domain/0/domid\x000")
        except BaseException:
            self.stop()
            raise

    def _clear_stale_socket(self) -> None:
        if not self.socket_path.exists() and not self.socket_path.is_symlink():
            return
        try:
            request(self.socket_path, wire.Op.READ, b"/\0", timeout=0.5)
        except OSError:
            try:
                self.socket_path.unlink()  # left behind by a killed daemon
            except OSError as e:
                raise XenstoredError(f"cannot remove stale {self.socket_path}: {e.strerror}") from e
            return
        except ProtocolError:
            pass
        raise XenstoredError(f"another xenstored already answers on {self.socket_path}; stop it first")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise XenstoredError(
                    f"xenstored exited with status {self._proc.returncode} during start-up{self._tail()}"
                )
            if self.socket_path.exists():
                try:
                    request(self.socket_path, wire.Op.READ, b"/\0", timeout=0.5)
                    return
                except (OSError, ProtocolError) as e:
                    last = e
            time.sleep(0.01)
        raise XenstoredError(
            f"xenstored did not answer on {self.socket_path} within {self.start_timeout:g}s ({last}){self._tail()}"
        )

    def _write(self, payload: bytes) -> None:
        kind, body = request(self.socket_path, wire.Op.WRITE, payload)
        if kind != wire.Op.WRITE:
            raise XenstoredError(f"xenstored refused a set-up write: {body!r}")

    def _tail(self, lines: int = 15) -> str:
        out = ""
        for path in (self.log_path, self.trace_path):
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            if text:
                out += f"\n--- {path.name} (last {len(text)} lines) ---\n" + "\n".join(text)
        return out

    def stop(self, *, kill: bool = False) -> None:
        """Stop xenstored (SIGTERM, SIGKILL after 5s; at once with kill=True). Safe to call twice."""
        proc, self._proc = self._proc, None
        _running.discard(self)
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    def restart(self) -> None:
        """Kill xenstored like a crash and start a fresh one on the same socket. The store starts empty."""
        self.stop(kill=True)
        self.start()

    def __enter__(self) -> Xenstored:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@atexit.register
def _stop_all() -> None:
    for xsd in list(_running):
        xsd.stop(kill=True)
