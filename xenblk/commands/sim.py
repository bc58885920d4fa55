"""`xenblk sim host|guest`: the simulated Xen host, and a simulated blkfront guest running a workload."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from xenblk import config
from xenblk.errors import XenblkError


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
    _register_guest(ssub)


def _register_guest(ssub: Any) -> None:
    from xenblk.sim.guest_workload import HOSTILE_MODES, RW_MODES

    g = ssub.add_parser(
        "guest",
        help="a simulated blkfront: connect the disks attached to a domain and run a workload",
        description="Plays Linux blkfront's handshake for each disk of domain N, then runs the workload on every "
        "disk at once (each queue is a C thread filling its ring). Exits non-zero on a failed connect, an I/O error "
        "or a verify error, with one line per failure on stderr. A disk the backend resizes while connected is read "
        "again (its JSON record counts `resizes`); a disk detached by the toolstack (`xenblk detach`) drains, closes "
        "and is marked `detached` (an interrupted workload fails the run; an --idle guest ends once all are gone).",
    )
    g.add_argument("--dir", required=True, metavar="DIR", help="the sim host's directory")
    g.add_argument("--domid", required=True, type=int, metavar="N")
    g.add_argument("--vdev", action="append", metavar="xvdX", help="disk to use (repeatable; default: all attached)")
    g.add_argument("--rw", choices=list(RW_MODES), default="read", help="workload (fio's names; trim = discards)")
    g.add_argument("--bs", default="4k", help="bytes per I/O: 512..4M, e.g. 4k, 128k, 1M (default 4k)")
    g.add_argument("--iodepth", type=int, default=1, help="I/Os in flight per queue (default 1)")
    g.add_argument("--runtime", type=float, default=None, metavar="SECONDS", help="stop after this long")
    g.add_argument(
        "--until-stopped",
        action="store_true",
        help="no end of its own: run the workload (or stay --idle) until SIGTERM/SIGINT, then drain and report",
    )
    g.add_argument("--size", default=None, metavar="BYTES", help="bytes of I/O per disk (default: the disk once)")
    g.add_argument("--verify", action="store_true", help="check data: written blocks read back, reads vs writes")
    g.add_argument("--seed", type=int, default=0, help="data pattern and random order seed (default 0)")
    g.add_argument("--rwmixread", type=int, default=50, help="percent reads for rw/randrw (default 50)")
    g.add_argument("--flush-every", type=int, default=0, metavar="N", help="a FLUSH after every N writes")
    g.add_argument("--discard-every", type=int, default=0, metavar="N", help="a DISCARD instead of every N-th I/O")
    g.add_argument("--abi", choices=["x86_64-abi", "x86_32-abi"], default="x86_64-abi", help="ring layout")
    g.add_argument("--ring-order", type=int, choices=range(5), default=0, help="ring pages = 2^order (0..4)")
    g.add_argument("--queues", type=int, default=1, help="queues (rings) per disk, capped by the backend")
    g.add_argument("--indirect", action="store_true", help="every read/write as an INDIRECT request")
    g.add_argument("--no-persistent", action="store_true", help="do not offer persistent grants")
    g.add_argument(
        "--idle", action="store_true", help="connect, do no I/O, stay until --runtime, SIGTERM or every disk detached"
    )
    g.add_argument(
        "--expect-resize",
        action="store_true",
        help="once connected, wait (up to --timeout) until the backend publishes a new size of every disk, then run "
        "the workload over the resized disks",
    )
    g.add_argument("--timeout", type=float, default=30.0, help="seconds for each handshake step (default 30)")
    g.add_argument("--io-timeout", type=float, default=30.0, help="seconds without a response = failure")
    g.add_argument(
        "--hostile",
        choices=list(HOSTILE_MODES),
        default=None,
        help="misbehave for --runtime (default 2 s): overflow the request producer, send garbage requests, revoke "
        "grants of in-flight requests, never drain responses, flood the event channel with notifications, "
        "rewrite published requests while the backend processes them, keep the ring full of --bs writes over one "
        "I/O's pages (big-writes), or write and discard one block in a loop, never flushing (discard-loop); the run "
        "succeeds if the handshake did",
    )
    g.add_argument(
        "--count",
        type=int,
        default=None,
        metavar="N",
        help="--hostile garbage: send N requests per disk; big-writes: N writes; discard-loop: N rounds; flood: N "
        "notifications; then stop",
    )
    g.add_argument("--json", action="store_true", help="print the result as JSON")
    g.set_defaults(func=run_guest)


def run_host(args: argparse.Namespace, cfg: config.Config) -> int:
    from xenblk.sim.host import run_host as run

    asyncio.run(run(args.dir))
    return 0


def run_guest(args: argparse.Namespace, cfg: config.Config) -> int:
    from xenblk.sim.guest import GuestOptions, main
    from xenblk.sim.guest_frontend import FrontendOptions
    from xenblk.sim.guest_workload import Workload, parse_size

    if args.queues < 1:
        raise XenblkError("--queues must be at least 1")
    workload = Workload(
        rw=None if args.idle else args.rw,
        bs=parse_size(args.bs),
        iodepth=args.iodepth,
        runtime=args.runtime if args.runtime is not None or args.hostile is None else 2.0,
        size=parse_size(args.size) if args.size is not None else None,
        verify=args.verify,
        seed=args.seed,
        rwmix_read=args.rwmixread,
        flush_every=args.flush_every,
        discard_every=args.discard_every,
        io_timeout=args.io_timeout,
        hostile=args.hostile,
        count=args.count,
        until_stopped=args.until_stopped,
    )
    frontend = FrontendOptions(
        abi=args.abi,
        ring_order=args.ring_order,
        queues=args.queues,
        indirect=args.indirect,
        persistent=not args.no_persistent,
        timeout=args.timeout,
    )
    opts = GuestOptions(Path(args.dir), args.domid, args.vdev, workload, frontend, expect_resize=args.expect_resize)
    return main(opts, args.json)
