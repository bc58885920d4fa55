"""`xenblk attach`: give a domain a disk (the toolstack's side of the VBD handshake)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from xenblk import config
from xenblk.commands._common import add_qos_args, add_sim_arg, qos_from_args, xenstore_path

WAIT_CHOICES = ("connected", "initwait")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "attach",
        help="attach an image to a domain as a virtual disk",
        description="Writes the frontend and backend XenStore nodes for a new VBD with the permissions libxl uses "
        "(frontend dir owned by the guest, readable by the backend domain; backend dir owned by the backend domain, "
        "readable by the guest), then state 1 on both. The running `xenblk serve` picks it up. In --sim mode the "
        "simulated domain is created first if it does not exist. QoS options become the backend node's qos/ keys "
        "(change them later with `xenblk qos`); unset ones come from [qos] in the config.",
    )
    p.add_argument("domid", type=int, metavar="DOMID", help="the guest domain")
    p.add_argument(
        "image",
        metavar="IMAGE",
        help="[format:]path of the image (relative paths are made absolute), or rbd:POOL/IMAGE[@SNAP]",
    )
    p.add_argument("--vdev", default="xvdb", help="virtual device name in the guest (default xvdb)")
    p.add_argument(
        "--format",
        choices=["raw", "qcow2", "vhd", "block", "rbd"],
        default=None,
        help="image format (default: block if IMAGE is a block device, else raw; never guessed from contents)",
    )
    p.add_argument("--mode", choices=["r", "w"], default="w", help="r: read-only disk, w: read-write (default)")
    p.add_argument("--cdrom", action="store_true", help="present the disk as a CD-ROM (device-type cdrom)")
    p.add_argument("--type", dest="btype", default=None, help="backend type (default: first of daemon.backend_types)")
    p.add_argument(
        "--wait",
        nargs="?",
        const="connected",
        default=None,
        choices=WAIT_CHOICES,
        help="wait until the backend is Connected (--wait, which needs a running frontend) or only in InitWait "
        "(--wait=initwait: the daemon opened the image and waits for the guest); on failure print the backend's "
        "error node and exit 1",
    )
    p.add_argument("--timeout", type=float, default=30.0, help="seconds --wait waits (default 30)")
    add_qos_args(p)
    add_sim_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace, cfg: config.Config) -> int:
    from xenblk import toolstack
    from xenblk.xen.states import XenbusState as S
    from xenblk.xenstore import XenStore

    btype = args.btype or cfg.daemon.backend_types[0]
    params = toolstack.image_params(args.image, args.format)
    qos = qos_from_args(args)
    toolstack.paths(cfg.daemon.domid, btype, args.domid, args.vdev)  # the vdev name is checked before anything
    if args.sim is not None:
        from xenblk.sim.broker import ensure_domain

        ensure_domain(args.sim, args.domid)

    async def go() -> int:
        async with XenStore.open(xenstore_path(cfg, args.sim), timeout=cfg.xenstore.timeout) as xs:
            p = await toolstack.attach(
                xs,
                self_domid=cfg.daemon.domid,
                domid=args.domid,
                btype=btype,
                vdev=args.vdev,
                params=params,
                mode=args.mode,
                cdrom=args.cdrom,
                qos=qos,
            )
            print(f"attached {params} to domain {args.domid} as {args.vdev} ({p.backend})")
            if args.wait is None:
                return 0
            want = S.CONNECTED if args.wait == "connected" else S.INIT_WAIT
            ok, why = await toolstack.wait_backend(xs, p.backend, want, args.timeout)
            if not ok:
                print(f"xenblk: {args.vdev} of domain {args.domid} is not {args.wait}: {why}", file=sys.stderr)
                return 1
            return 0

    return asyncio.run(go())
