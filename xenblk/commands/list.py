"""`xenblk list`: the virtual disks, from XenStore and the running daemon."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from xenblk import config
from xenblk.commands._common import add_sim_arg, xenstore_path


def register(sub: Any) -> None:
    p = sub.add_parser(
        "list",
        help="list the virtual disks (domain, vdev, image, format, state, queues, ring order, features, in-flight)",
        description="Reads every VBD under the configured backend types from XenStore; in-flight requests come from "
        "the running daemon's control socket (shown as - when the daemon is not running).",
    )
    p.add_argument("--json", action="store_true", help="print a JSON list of rows")
    add_sim_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace, cfg: config.Config) -> int:
    from xenblk import toolstack
    from xenblk.backend import control
    from xenblk.xenstore import XenStore

    async def go() -> list[dict[str, Any]]:
        async with XenStore.open(xenstore_path(cfg, args.sim), timeout=cfg.xenstore.timeout) as xs:
            return await toolstack.list_devices(xs, cfg.daemon.domid, cfg.daemon.backend_types)

    rows = asyncio.run(go())
    try:
        live = control.call(cfg.daemon.run_dir, {"op": "list"}, timeout=10).get("devices", [])
    except (control.DaemonNotRunning, OSError):
        live = []
    by_key = {(d["domid"], d["devid"]): d for d in live}
    for r in rows:
        d = by_key.get((r["domid"], r["devid"]))
        if d is not None:
            r["in_flight"] = d.get("in_flight")
            r["format"] = d.get("format") or r["format"]  # the daemon knows what "auto" resolved to
            r["nbd"] = d.get("nbd")  # the NBD export's socket and counters, when the disk has one
            r["qos"] = d.get("qos")  # the QoS limits in force and the group (README, "QoS")
            if d.get("lock_wait"):
                r["lock_wait"] = d["lock_wait"]  # the image is held elsewhere: this disk waits for it
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_rows(rows))
    return 0


def format_rows(rows: list[dict[str, Any]]) -> str:
    from xenblk.xen.states import name

    head = (
        f"{'DOMID':>5} {'VDEV':<6} {'STATE':<12} {'FORMAT':<6} {'Q':>2} {'ORD':>3} {'INFL':>4}  {'FEATURES':<42} IMAGE"
    )
    out = [head]
    for r in rows:
        state = name(r["state"]) + ("!" if r.get("error") else "")
        out.append(
            f"{r['domid']:>5} {r['vdev']:<6} {state:<12} {r['format']:<6} {_dash(r['queues']):>2} "
            f"{_dash(r['ring_order']):>3} {_dash(r['in_flight']):>4}  {','.join(r['features']) or '-':<42} {r['image']}"
        )
        if r.get("error"):
            out.append(f"{'':>5} error: {r['error']}")
        if r.get("lock_wait"):
            out.append(f"{'':>5} waiting for the image: {r['lock_wait']}")
    if not rows:
        out.append("(no virtual disks)")
    return "\n".join(out)


def _dash(v: Any) -> str:
    return "-" if v is None else str(v)
