"""The grant/event broker: the simulated hypervisor of `xenblk sim host` (docs/DESIGN.md, "Broker protocol").

It owns each simulated domain's memory and grant table (sealed memfds, handed out to the
guest and to the backend, so both map the same pages) and the event channels (a pair of
eventfds each). Clients speak one JSON request per line and get one JSON reply per line,
with file descriptors as SCM_RIGHTS on the reply. A bad request gets `{"ok": false, ...}`;
a bad client is disconnected; neither stops the broker.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import contextvars
import errno
import fcntl
import json
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from xenblk.errors import XenblkError
from xenblk.xen.paths import domain_path
from xenblk.xenstore import Perm, XenStore

log = structlog.get_logger(__name__)

PAGE_SIZE = 4096
GRANT_ENTRY_SIZE = 8  # struct xb_grant_entry_v1
DEFAULT_MEM_PAGES = 32768  # 128 MiB
DEFAULT_GNTTAB_ENTRIES = 32768
MAX_MEM_PAGES = 1 << 20  # 4 GiB of (sparse) guest memory
MAX_GNTTAB_ENTRIES = 1 << 20
DOMID_FIRST_RESERVED = 0x7FF0  # Xen: DOMID_SELF and friends start here
MAX_PORTS_PER_DOMAIN = 4096
MAX_LINE = 64 * 1024
# The client connection a request came on: ports bound over it are closed when it ends (as Xen
# closes a process's event channels when it dies), so a restarted backend can bind them again.
_connection: contextvars.ContextVar[object | None] = contextvars.ContextVar("_connection", default=None)
SUN_PATH_MAX = 108


class BrokerError(XenblkError):
    """The broker refused a request (its message), or cannot be reached."""


class _Refused(Exception):
    """A request the broker answers with ok=false."""


@dataclass
class _Domain:
    domid: int
    name: str
    mem_pages: int
    gnttab_entries: int
    mem_fd: int
    gnttab_fd: int

    def close(self) -> None:
        for fd in (self.mem_fd, self.gnttab_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass
class _Channel:
    """One interdomain channel: the unbound side's domain/port and, once bound, the other side's."""

    domid: int
    port: int
    remote_domid: int
    to_remote: int  # eventfd: written by `domid`, read by the remote side
    to_local: int  # eventfd: written by the remote side, read by `domid`
    remote_port: int | None = None
    local_open: bool = True
    bound_by: object | None = None  # the client connection that bound the remote side

    def close_fds(self) -> None:
        for fd in (self.to_remote, self.to_local):
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass
class _Ports:
    """A domain's event-channel port space: port -> (channel, is the unbound (allocating) side)."""

    by_port: dict[int, tuple[_Channel, bool]] = field(default_factory=dict)

    def free_port(self) -> int:
        for p in range(1, MAX_PORTS_PER_DOMAIN):
            if p not in self.by_port:
                return p
        raise _Refused("no free event-channel port")


def sealed_memfd(name: str, size: int) -> int:
    """A guest's memory or grant table: a memfd whose size is sealed."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        # Nobody holding the fd may change its size: a shrunk file would SIGBUS every mapping of it.
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _int(req: dict[str, Any], key: str, lo: int, hi: int, default: int | None = None) -> int:
    v = req.get(key, default)
    if v is None:
        raise _Refused(f"missing {key!r}")
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise _Refused(f"{key!r} must be an integer in {lo}..{hi}, not {v!r}")
    return v


class Broker:
    """The broker state and request handling. `serve()` runs the socket server until cancelled."""

    def __init__(self, socket_path: Path | str, xenstored_path: Path | str) -> None:
        self.socket_path = Path(socket_path)
        self.xenstored_path = str(xenstored_path)
        self.domains: dict[int, _Domain] = {}
        self.ports: dict[int, _Ports] = {}
        self._xs: XenStore | None = None
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        if len(os.fsencode(self.socket_path)) >= SUN_PATH_MAX:
            raise BrokerError(f"socket path {self.socket_path} is too long for a unix socket; use a shorter dir")
        self._xs = await XenStore.open(self.xenstored_path, timeout=10.0)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self._server = await asyncio.start_unix_server(self._accept, str(self.socket_path), limit=MAX_LINE)
        self.socket_path.chmod(0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for t in list(self._clients):
            t.cancel()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        for ports in self.ports.values():
            for ch, unbound_side in ports.by_port.values():
                if unbound_side:
                    ch.close_fds()
        self.ports.clear()
        for d in self.domains.values():
            d.close()
        self.domains.clear()
        if self._xs is not None:
            await self._xs.close()
            self._xs = None

    # ---- connection handling ----

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        _connection.set(task)
        # Every reply goes out through this dup with sendmsg (fds ride on it); the transport only reads.
        out: socket.socket = writer.get_extra_info("socket").dup()
        try:
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.LimitOverrunError:
                    await _send(out, {"ok": False, "error": f"request longer than {MAX_LINE} bytes"}, [])
                    return
                except asyncio.IncompleteReadError:
                    return
                reply, fds = await self.handle_line(line)
                await _send(out, reply, fds)
        except (ConnectionError, OSError, TimeoutError) as e:
            log.debug("broker client dropped", error=str(e) or type(e).__name__)
        finally:
            self._clients.discard(task)
            self._release_bindings(task)
            out.close()
            writer.close()

    async def handle_line(self, line: bytes) -> tuple[dict[str, Any], list[int]]:
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise _Refused("a request is a JSON object")
            op = req.get("op")
            handler = self._ops.get(op) if isinstance(op, str) else None
            if handler is None:
                raise _Refused(f"unknown op {op!r}")
            return await handler(self, req)
        except _Refused as e:
            return {"ok": False, "error": str(e)}, []
        except (ValueError, UnicodeDecodeError) as e:
            return {"ok": False, "error": f"malformed request: {e}"}, []
        except XenblkError as e:
            return {"ok": False, "error": str(e)}, []
        except OSError as e:
            return {"ok": False, "error": f"{e.strerror or e}"}, []

    # ---- domains ----

    async def _create_domain(self, req: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        domid = _int(req, "domid", 1, DOMID_FIRST_RESERVED - 1)
        name = req.get("name", f"sim-guest-{domid}")
        if not isinstance(name, str) or not name or len(name) > 64 or not name.isprintable():
            raise _Refused(f"'name' must be a printable string of 1..64 characters, not {name!r}")
        dom = self.domains.get(domid)
        if dom is None:
            mem_pages = _int(req, "mem_pages", 1, MAX_MEM_PAGES, DEFAULT_MEM_PAGES)
            entries = _int(req, "gnttab_entries", 1, MAX_GNTTAB_ENTRIES, DEFAULT_GNTTAB_ENTRIES)
            mem_fd = sealed_memfd(f"xenblk-dom{domid}-mem", mem_pages * PAGE_SIZE)
            try:
                gnt_fd = sealed_memfd(f"xenblk-dom{domid}-gnttab", entries * GRANT_ENTRY_SIZE)
            except BaseException:
                os.close(mem_fd)
                raise
            dom = _Domain(domid, name, mem_pages, entries, mem_fd, gnt_fd)
            self.domains[domid] = dom
            try:
                await self._introduce(dom)
            except BaseException:
                del self.domains[domid]
                dom.close()
                raise
            log.info("sim domain created", domid=domid, mem_pages=mem_pages, gnttab_entries=entries)
        elif await self._xs_missing(dom):
            await self._introduce(dom)  # xenstored was restarted (its store starts empty): the toolstack's nodes again
        return self._domain_reply(dom)

    async def _xs_missing(self, dom: _Domain) -> bool:
        assert self._xs is not None
        return await self._xs.try_read(f"{domain_path(dom.domid)}/domid") is None

    async def _introduce(self, dom: _Domain) -> None:
        assert self._xs is not None
        base = domain_path(dom.domid)
        await self._xs.write(f"{base}/name", dom.name)
        await self._xs.write(f"{base}/domid", str(dom.domid))
        await self._xs.set_perms(base, [Perm("n", dom.domid), Perm("r", 0)])

    @staticmethod
    def _domain_reply(dom: _Domain) -> tuple[dict[str, Any], list[int]]:
        reply = {"ok": True, "mem_pages": dom.mem_pages, "gnttab_entries": dom.gnttab_entries}
        return reply, [dom.mem_fd, dom.gnttab_fd]

    async def _map_domain(self, req: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        domid = _int(req, "domid", 0, DOMID_FIRST_RESERVED - 1)
        dom = self.domains.get(domid)
        if dom is None:
            raise _Refused(f"no simulated domain {domid}")
        return self._domain_reply(dom)

    async def _destroy_domain(self, req: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        domid = _int(req, "domid", 1, DOMID_FIRST_RESERVED - 1)
        dom = self.domains.pop(domid, None)
        if dom is None:
            raise _Refused(f"no simulated domain {domid}")
        for port in list(self.ports.get(domid, _Ports()).by_port):
            self._close_port(domid, port)
        self.ports.pop(domid, None)
        dom.close()
        assert self._xs is not None
        await self._xs.rm(domain_path(domid))
        log.info("sim domain destroyed", domid=domid)
        return {"ok": True}, []

    # ---- event channels ----

    async def _alloc_unbound(self, req: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        domid = _int(req, "domid", 0, DOMID_FIRST_RESERVED - 1)
        remote = _int(req, "remote_domid", 0, DOMID_FIRST_RESERVED - 1)
        if domid != 0 and domid not in self.domains:
            raise _Refused(f"no simulated domain {domid}")
        ports = self.ports.setdefault(domid, _Ports())
        port = ports.free_port()
        flags = os.EFD_CLOEXEC | os.EFD_NONBLOCK
        to_remote = os.eventfd(0, flags)
        try:
            to_local = os.eventfd(0, flags)
        except BaseException:
            os.close(to_remote)
            raise
        ch = _Channel(domid, port, remote, to_remote=to_remote, to_local=to_local)
        ports.by_port[port] = (ch, True)
        return {"ok": True, "port": port}, [ch.to_local, ch.to_remote]

    async def _bind_interdomain(self, req: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        domid = _int(req, "domid", 0, DOMID_FIRST_RESERVED - 1)
        remote = _int(req, "remote_domid", 0, DOMID_FIRST_RESERVED - 1)
        remote_port = _int(req, "remote_port", 1, MAX_PORTS_PER_DOMAIN - 1)
        entry = self.ports.get(remote, _Ports()).by_port.get(remote_port)
        if entry is None or not entry[1]:
            raise _Refused(f"domain {remote} has no unbound port {remote_port}")
        ch = entry[0]
        if ch.remote_domid != domid:
            raise _Refused(f"port {remote_port} of domain {remote} is for domain {ch.remote_domid}, not {domid}")
        if ch.remote_port is not None:
            raise _Refused(f"port {remote_port} of domain {remote} is already bound")
        ports = self.ports.setdefault(domid, _Ports())
        port = ports.free_port()
        ch.remote_port = port
        ports.by_port[port] = (ch, False)
        ch.bound_by = _connection.get()
        return {"ok": True, "port": port}, [ch.to_remote, ch.to_local]

    async def _close(self, req: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        domid = _int(req, "domid", 0, DOMID_FIRST_RESERVED - 1)
        port = _int(req, "port", 1, MAX_PORTS_PER_DOMAIN - 1)
        if port not in self.ports.get(domid, _Ports()).by_port:
            raise _Refused(f"domain {domid} has no port {port}")
        self._close_port(domid, port)
        return {"ok": True}, []

    def _release_bindings(self, conn: object) -> None:
        """The client is gone (a killed daemon): the ports it bound and did not close are unbound
        again, so the guest's ports can be bound anew; the guest keeps its end and its eventfds."""
        for domid, ports in self.ports.items():
            for port, (ch, unbound_side) in list(ports.by_port.items()):
                if not unbound_side and ch.bound_by is conn:
                    self._close_port(domid, port)

    def _close_port(self, domid: int, port: int) -> None:
        ch, unbound_side = self.ports[domid].by_port.pop(port)
        if unbound_side:
            ch.local_open = False
        else:
            # Like Xen: the allocating side's port becomes unbound again and can be bound anew.
            ch.remote_port = None
            ch.bound_by = None
        if not ch.local_open and ch.remote_port is None:
            ch.close_fds()

    _ops = {
        "create_domain": _create_domain,
        "map_domain": _map_domain,
        "destroy_domain": _destroy_domain,
        "evtchn_alloc_unbound": _alloc_unbound,
        "evtchn_bind_interdomain": _bind_interdomain,
        "evtchn_close": _close,
    }


async def _send(sock: socket.socket, reply: dict[str, Any], fds: list[int], timeout: float = 10.0) -> None:
    """Send one reply line (fds on its first byte), waiting for a slow reader up to `timeout`."""
    data = (json.dumps(reply) + "\n").encode()
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    deadline = asyncio.get_running_loop().time() + timeout
    while data:
        try:
            sent = sock.sendmsg([data], anc)
        except BlockingIOError:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("client does not read its replies") from None
            await asyncio.sleep(0.005)
            continue
        data, anc = data[sent:], []


class BrokerClient:
    """A blocking client of the broker; one request at a time (thread-safe)."""

    def __init__(self, path: Path | str, timeout: float = 10.0) -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(self.path)
        except OSError as e:
            self._sock.close()
            raise BrokerError(f"cannot reach the sim broker at {self.path}: {e.strerror or e}") from e
        self._buf = b""

    def call(self, req: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        """Send one request; the reply and the fds that came with it (the caller owns them)."""
        with self._lock:
            try:
                self._sock.sendall((json.dumps(req) + "\n").encode())
                reply_line, fds = self._read_line()
            except OSError as e:
                raise BrokerError(f"sim broker at {self.path}: {e.strerror or e}") from e
        try:
            reply = json.loads(reply_line)
            if not isinstance(reply, dict):
                raise ValueError("not an object")
        except ValueError as e:
            _close_all(fds)
            raise BrokerError(f"sim broker sent a malformed reply: {reply_line[:200]!r}") from e
        if not reply.get("ok"):
            _close_all(fds)
            raise BrokerError(f"sim broker refused {req.get('op')}: {reply.get('error', 'no reason given')}")
        return reply, fds

    def _read_line(self) -> tuple[bytes, list[int]]:
        fds: list[int] = []
        try:
            while b"\n" not in self._buf:
                data, anc, _flags, _addr = self._sock.recvmsg(65536, socket.CMSG_SPACE(16 * 4))
                for level, kind, payload in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        arr = array.array("i")
                        arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                        fds.extend(arr)
                if not data:
                    raise OSError(errno.ECONNRESET, "the broker closed the connection")
                self._buf += data
        except BaseException:
            _close_all(fds)
            raise
        line, _, self._buf = self._buf.partition(b"\n")
        return line, fds

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def read_host_json(sim_dir: Path | str) -> dict[str, Any]:
    """`DIR/host.json` of a running `xenblk sim host`, or a clear error."""
    path = Path(sim_dir) / "host.json"
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise BrokerError(
            f"no simulated host in {sim_dir} ({path} missing): start `xenblk sim host --dir {sim_dir}`"
        ) from None
    except (OSError, ValueError) as e:
        raise BrokerError(f"cannot read {path}: {e}") from e
    if not isinstance(info, dict) or not all(isinstance(info.get(k), str) for k in ("xenstored_path", "broker")):
        raise BrokerError(f"{path} is not a sim host description")
    return info


def ensure_domain(sim_dir: Path | str, domid: int, name: str | None = None) -> None:
    """Create the simulated domain `domid` on the host in `sim_dir` unless it exists (the toolstack's job)."""
    req: dict[str, Any] = {
        "op": "create_domain",
        "domid": domid,
        "mem_pages": DEFAULT_MEM_PAGES,
        "gnttab_entries": DEFAULT_GNTTAB_ENTRIES,
    }
    if name is not None:
        req["name"] = name
    with BrokerClient(read_host_json(sim_dir)["broker"]) as client:
        _reply, fds = client.call(req)
        _close_all(fds)
