"""`xenblk detach`: take a virtual disk away from a domain."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from xenblk import config
from xenblk.commands._common import add_sim_arg, xenstore_path


def register(sub: Any) -> None:
    p = sub.add_parser(
        "detach",
        help="detach a virtual disk from a domain",
        description="As libxl: writes online=0 and state 5 (Closing) to the backend, waits until the daemon has "
        "drained and closed the device (state 6), then removes the frontend and backend dirs. A connected frontend "
        "must close its side first; --force removes both dirs at once without waiting.",
    )
    p.add_argument("domid", type=int, metavar="DOMID")
    p.add_argument("vdev", metavar="VDEV", help="virtual device name, e.g. xvdb")
    p.add_argument("--type", dest="btype", default=None, help="backend type (default: first of daemon.backend_types)")
    p.add_argument("--force", action="store_true", help="remove the nodes at once, without waiting for Closed")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for Closed (default 30)")
    add_sim_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace, cfg: config.Config) -> int:
    from xenblk import toolstack
    from xenblk.xenstore import XenStore

    btype = args.btype or cfg.daemon.backend_types[0]
    p = toolstack.paths(cfg.daemon.domid, btype, args.domid, args.vdev)

    async def go() -> int:
        async with XenStore.open(xenstore_path(cfg, args.sim), timeout=cfg.xenstore.timeout) as xs:
            ok, why = await toolstack.detach(xs, p, force=args.force, timeout=args.timeout)
        if not ok:
            print(f"xenblk: {args.vdev} of domain {args.domid} did not close: {why} (use --force)", file=sys.stderr)
            return 1
        print(f"detached {args.vdev} from domain {args.domid}")
        return 0

    return asyncio.run(go())
