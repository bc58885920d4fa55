"""`xenblk resize`: tell the daemon an image grew, so the guest sees the new size."""

from __future__ import annotations

import argparse
from typing import Any

from xenblk import config
from xenblk.commands._common import add_sim_arg


def register(sub: Any) -> None:
    p = sub.add_parser(
        "resize",
        help="publish an image's new size to the guest (online resize)",
        description="Asks the running `xenblk serve` (over <daemon.run_dir>/control.sock) to re-read the image size; "
        "if it changed, the new `sectors` and state 4 are written in one transaction, and blkfront resizes the disk. "
        "Block devices are picked up by themselves from kernel uevents; files need this command.",
    )
    p.add_argument("domid", type=int, metavar="DOMID")
    p.add_argument("vdev", metavar="VDEV", help="virtual device name, e.g. xvdb")
    add_sim_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace, cfg: config.Config) -> int:
    from xenblk.backend import control
    from xenblk.errors import XenblkError

    reply = control.call(cfg.daemon.run_dir, {"op": "resize", "domid": args.domid, "vdev": args.vdev})
    if not reply.get("ok"):
        raise XenblkError(str(reply.get("error")))
    if reply.get("changed"):
        print(f"{args.vdev} of domain {args.domid}: {reply['old_sectors']} -> {reply['sectors']} sectors")
    else:
        print(f"{args.vdev} of domain {args.domid}: size unchanged ({reply['sectors']} sectors)")
    return 0
