"""The toolstack's side of the handshake (what `xl`/libxl does), for `xenblk attach/detach/list`.

Every step is its own small transaction, as in docs/DESIGN.md ("xenstored 4.17 was seen
to fail SET_PERMS inside one large transaction").
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any

from xenblk.errors import XenblkError
from xenblk.xen.params import FORMAT_ALIASES, NETWORK_FORMATS, ParamsError, join_params, split_known
from xenblk.xen.paths import backend_path, backend_type_path, frontend_path
from xenblk.xen.states import XenbusState as S
from xenblk.xen.states import name, parse_state
from xenblk.xen.vdev import devid_to_vdev, vdev_to_devid
from xenblk.xenstore import Perm, Transaction, XenStore, XenStoreError


@dataclass(frozen=True)
class Paths:
    backend: str
    frontend: str
    devid: int


def paths(self_domid: int, btype: str, domid: int, vdev: str) -> Paths:
    devid = vdev_to_devid(vdev)
    return Paths(
        backend=backend_path(self_domid, btype, domid, devid),
        frontend=frontend_path(domid, devid),
        devid=devid,
    )


def image_params(image: str, fmt: str | None) -> str:
    """`[format:]path` with an absolute path; a prefix in IMAGE and --format must agree."""
    prefix, rest = split_known(image)
    if prefix is not None:
        if fmt is not None and FORMAT_ALIASES[prefix] != FORMAT_ALIASES.get(fmt, fmt):
            raise ParamsError(f"image {image!r} says format {prefix} but --format is {fmt}")
        fmt, image = prefix, rest
    if fmt is not None and FORMAT_ALIASES.get(fmt, fmt) in NETWORK_FORMATS:
        return join_params(fmt, image)
    path = os.path.abspath(image)
    return join_params(fmt, path)


async def attach(
    xs: XenStore,
    *,
    self_domid: int,
    domid: int,
    btype: str,
    vdev: str,
    params: str,
    mode: str,
    cdrom: bool,
    qos: dict[str, str] | None = None,
) -> Paths:
    p = paths(self_domid, btype, domid, vdev)
    if await xs.try_read(f"{p.backend}/state") is not None:
        raise XenblkError(f"domain {domid} already has {vdev} ({p.backend}); detach it first")
    dtype = "cdrom" if cdrom else "disk"

    async def make_dir(path: str, perms: list[Perm]) -> None:
        async def body(t: Transaction) -> None:
            await t.mkdir(path)
            await t.set_perms(path, perms)

        await xs.transact(body)

    async def write_all(base: str, values: dict[str, str]) -> None:
        async def body(t: Transaction) -> None:
            for k, v in values.items():
                await t.write(f"{base}/{k}", v)

        await xs.transact(body)

    # 1. the directories, with libxl's permissions
    await make_dir(p.backend, [Perm("n", self_domid), Perm("r", domid)])
    await make_dir(p.frontend, [Perm("n", domid), Perm("r", self_domid)])
    # 2. the keys
    await write_all(
        p.frontend,
        {"backend": p.backend, "backend-id": str(self_domid), "virtual-device": str(p.devid), "device-type": dtype},
    )
    await write_all(
        p.backend,
        {
            "frontend": p.frontend,
            "frontend-id": str(domid),
            "online": "1",
            "removable": "0",
            "bootable": "1",
            "dev": vdev,
            "mode": mode,
            "device-type": dtype,
            "type": btype,
            "params": params,
            **{f"qos/{k}": v for k, v in (qos or {}).items()},  # read by the daemon before it connects
        },
    )
    # 3. the frontend's state first, then the backend's: the backend may start at once
    await write_all(p.frontend, {"state": str(int(S.INITIALISING))})
    await write_all(p.backend, {"state": str(int(S.INITIALISING))})
    return p


async def set_qos(xs: XenStore, path: str, values: dict[str, str], *, clear: bool, must_exist: str | None) -> None:
    """Write qos keys under `path` (a backend node's qos/ or a group's directory), in one transaction;
    clear: remove the keys there first. must_exist: a node that must be there (the backend's state), so a
    device detached meanwhile is not created again."""

    async def body(t: Transaction) -> None:
        if must_exist is not None and await t.try_read(must_exist) is None:
            raise XenblkError(f"no such device ({must_exist} does not exist)")
        if clear:
            await t.rm(path)
        for k, v in values.items():
            await t.write(f"{path}/{k}", v)

    await xs.transact(body)


async def read_qos(xs: XenStore, path: str) -> dict[str, str]:
    """The keys under a qos node as written (absent: {})."""
    try:
        names = await xs.directory(path)
    except XenStoreError:
        return {}
    out = {}
    for n in sorted(names)[:64]:
        v = await xs.try_read(f"{path}/{n}")
        if v is not None:
            out[n] = v
    return out


async def wait_backend(xs: XenStore, backend: str, want: int, timeout: float) -> tuple[bool, str]:
    """Wait for B/state == want; (True, "") or (False, why): the error node, or the state at timeout."""
    last: int | None = None
    try:
        async with asyncio.timeout(timeout), xs.watch(backend) as w:
            async for _ in w:
                last = parse_state(await xs.try_read(f"{backend}/state"))
                if last == want:
                    return True, ""
                error = await xs.try_read(f"{backend}/error")
                if last == S.CLOSED and error:
                    return False, error
                if last is None and want == S.CLOSED:
                    return True, ""  # the daemon already removed it
    except TimeoutError:
        pass
    return False, f"backend state is {name(last)} after {timeout:g}s"


async def detach(xs: XenStore, p: Paths, *, force: bool, timeout: float) -> tuple[bool, str]:
    """online=0 and Closing (as libxl), wait for Closed, remove both dirs; force: remove at once."""
    if await xs.try_read(f"{p.backend}/state") is None and await xs.try_read(f"{p.frontend}/state") is None:
        raise XenblkError(f"no such device ({p.backend} does not exist)")
    ok, why = True, ""
    if not force:

        async def body(t: Transaction) -> None:
            if await t.try_read(f"{p.backend}/state") is not None:
                await t.write(f"{p.backend}/online", "0")
                await t.write(f"{p.backend}/state", str(int(S.CLOSING)))

        await xs.transact(body)
        ok, why = await wait_backend(xs, p.backend, S.CLOSED, timeout)
        if not ok:
            return False, why
    await xs.rm(p.frontend)
    await xs.rm(p.backend)
    return ok, why


async def list_devices(xs: XenStore, self_domid: int, btypes: list[str]) -> list[dict[str, Any]]:
    """Every VBD under the backend types, as XenStore describes it."""
    rows: list[dict[str, Any]] = []
    for btype in btypes:
        base = backend_type_path(self_domid, btype)
        try:
            domids = await xs.directory(base)
        except XenStoreError:
            continue
        for d in sorted((x for x in domids if x.isdigit()), key=int):
            try:
                devids = await xs.directory(f"{base}/{d}")
            except XenStoreError:
                continue
            for v in sorted((x for x in devids if x.isdigit()), key=int):
                rows.append(await _describe(xs, btype, int(d), int(v), f"{base}/{d}/{v}"))
    return rows


_BACKEND_FEATURES = (("feature-flush-cache", "flush"), ("feature-barrier", "barrier"), ("feature-discard", "discard"))


async def _describe(xs: XenStore, btype: str, domid: int, devid: int, b: str) -> dict[str, Any]:
    async def rd(path: str) -> str | None:
        try:
            return await xs.try_read(path)
        except XenStoreError:
            return None

    f = await rd(f"{b}/frontend") or ""
    params = await rd(f"{b}/params") or ""
    prefix, image = split_known(params)
    fmt = FORMAT_ALIASES[prefix] if prefix is not None else None
    try:
        vdev = devid_to_vdev(devid)
    except XenblkError:
        vdev = await rd(f"{b}/dev") or str(devid)

    async def num(path: str) -> int | None:
        v = await rd(path) if path.startswith("/") else None
        return int(v) if v is not None and v.isdigit() and len(v) < 12 else None

    bstate = parse_state(await rd(f"{b}/state"))
    fstate = parse_state(await rd(f"{f}/state")) if f.startswith("/") else None
    order = await num(f"{f}/ring-page-order") if f else None
    nq = await num(f"{f}/multi-queue-num-queues") if f else None
    connected = bstate == S.CONNECTED
    features: list[str] = []
    if connected:
        for key, label in _BACKEND_FEATURES:
            if await rd(f"{b}/{key}") == "1":
                features.append(label)
        if await rd(f"{b}/feature-persistent") == "1" and f and await rd(f"{f}/feature-persistent") == "1":
            features.append("persistent")
        if await num(f"{b}/feature-max-indirect-segments"):
            features.append("indirect")
    return {
        "domid": domid,
        "vdev": vdev,
        "devid": devid,
        "type": btype,
        "image": image,
        "format": fmt or "auto",
        "mode": await rd(f"{b}/mode"),
        "state": bstate,
        "frontend_state": fstate,
        "queues": (nq or 1) if connected else None,
        "ring_order": (order or 0) if connected else None,
        "sectors": await num(f"{b}/sectors"),
        "features": features,
        "error": await rd(f"{b}/error"),
        "in_flight": None,
    }
