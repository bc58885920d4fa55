"""`xenblk qos`: show or change a disk's QoS limits, or a group's, live (README, "QoS")."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from xenblk import config
from xenblk.commands._common import add_qos_args, add_sim_arg, qos_from_args, xenstore_path
from xenblk.errors import XenblkError


def register(sub: Any) -> None:
    p = sub.add_parser(
        "qos",
        help="show or change a disk's (or a group's) QoS limits, live",
        description="Writes the QoS options as keys of the disk's backend node qos/ (or, with --group, of "
        "/local/domain/<self>/xenblk/qos-groups/NAME/), as a toolstack would; the running `xenblk serve` watches "
        "them and applies a change at once, also to requests already held back. Keys not written keep their "
        "value; --clear removes them all first (back to [qos] / [qos_group] of the config). Without options, "
        "prints what is written there. A disk's --qos-group applies at its next connection.",
    )
    p.add_argument("domid", type=int, nargs="?", metavar="DOMID", help="the guest domain (not with --group)")
    p.add_argument("vdev", nargs="?", metavar="VDEV", help="its virtual device, e.g. xvdb")
    p.add_argument("--group", metavar="NAME", default=None, help="the limits of group NAME instead of a disk's")
    p.add_argument("--clear", action="store_true", help="remove every key written before")
    p.add_argument("--type", dest="btype", default=None, help="backend type (default: first of daemon.backend_types)")
    add_qos_args(p)
    add_sim_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace, cfg: config.Config) -> int:
    from xenblk import qos, toolstack
    from xenblk.xenstore import XenStore

    values = qos_from_args(args)
    if args.group is not None:
        if args.domid is not None:
            raise XenblkError("xenblk qos: either DOMID VDEV or --group NAME")
        if "group" in values:
            raise XenblkError("xenblk qos: --qos-group names a disk's group, not a group's")
        path = f"{qos.groups_path(cfg.daemon.domid)}/{qos.check_group(args.group)}"
        must_exist = None
        what = f"group {args.group}"
    else:
        if args.domid is None or args.vdev is None:
            raise XenblkError("xenblk qos: DOMID VDEV (or --group NAME) is needed")
        p = toolstack.paths(cfg.daemon.domid, args.btype or cfg.daemon.backend_types[0], args.domid, args.vdev)
        path = f"{p.backend}/qos"
        must_exist = f"{p.backend}/state"
        what = f"{args.vdev} of domain {args.domid}"

    async def go() -> int:
        async with XenStore.open(xenstore_path(cfg, args.sim), timeout=cfg.xenstore.timeout) as xs:
            if values or args.clear:
                await toolstack.set_qos(xs, path, values, clear=args.clear, must_exist=must_exist)
            elif must_exist is not None and await xs.try_read(must_exist) is None:
                raise XenblkError(f"no such device ({must_exist} does not exist)")
            now = await toolstack.read_qos(xs, path)
        print(json.dumps({"qos": what, "path": path, "keys": now}))
        return 0

    return asyncio.run(go())
