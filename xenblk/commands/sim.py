"""`xenblk sim host|guest`: the simulated Xen host, and a simulated blkfront guest running a workload."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from xenblk import config


def register(sub: Any) -> None:
    p = sub.add_parser("sim", help="the simulated Xen host and simulated guests (no hypervisor needed)")
    ssub = p.add_subparsers(dest="sim_command", metavar="ACTION", required=True)
    h = ssub.add_parser(
        "host",
        help="run the simulated Xen host (xenstored + grant/event broker) until SIGTERM/SIGINT",
        description="Runs the real xenstored under a shim plus the grant/event broker in DIR, writes DIR/host.json "
        "once both are ready and prints the XENSTORED_PATH for xenstore-* tools.",
    )
    h.add_argument("--dir", required=True, metavar="DIR", help="state directory (keep it short: unix socket paths)")
    h.set_defaults(func=run_host)


def run_host(args: argparse.Namespace, cfg: config.Config) -> int:
    from xenblk.sim.host import run_host as run

    asyncio.run(run(args.dir))
    return 0
