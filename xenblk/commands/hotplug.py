"""`xenblk hotplug add|remove`: the body of /etc/xen/scripts/block-xenblk, the hotplug script libxl runs
for a disk with `script=block-xenblk`.

libxl writes the backend dir (B/script names the script), waits for InitWait, then runs
`block-xenblk add` with XENBUS_PATH=backend/<type>/<domid>/<devid> (relative to Dom0's home).
`add` asks the running daemon (control op "take", with "publish") to open the image and waits until it
is open or refused: the daemon writes B/hotplug-status=connected (exit 0) or B/hotplug-error=<its reason>
(exit 1; written from here when the daemon does not answer), which libxl turns into "script: <reason>"
and a failed `xl create`/`xl block-attach`. block-xenblk itself runs xenblk/hotplug_client.py (the same
request, a faster start); this command is its fallback and what a checkout's XENBLK points it at.
`remove` (after the toolstack saw Closed) returns once the daemon holds no image for that dir.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from xenblk import config
from xenblk.commands._common import add_sim_arg, xenstore_path
from xenblk.xen.paths import domain_path

# libxl kills a hotplug script after 40 s (LIBXL_HOTPLUG_TIMEOUT); answer well before that.
DEFAULT_TIMEOUT = 30.0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "hotplug",
        help="Xen hotplug script body: add|remove the backend dir in $XENBUS_PATH (block-xenblk)",
        description="What /etc/xen/scripts/block-xenblk runs for libxl (`xl create`, `xl block-attach/-detach` with "
        "`script=block-xenblk` in the disk line). add: asks the running `xenblk serve` (control socket) to open the "
        "image of that backend dir, waits until it is open or refused, then writes hotplug-status=connected (exit "
        "0) or hotplug-error=<reason> (exit 1: xl prints the reason and the create/attach fails). remove: returns "
        "once the daemon has released the image. The backend dir comes from $XENBUS_PATH (libxl's "
        "backend/<type>/<domid>/<devid>, relative to daemon.domid) unless --backend is given.",
    )
    p.add_argument("action", choices=["add", "remove"], help="what libxl asks for")
    p.add_argument("--backend", default=None, metavar="PATH", help="backend dir (default: $XENBUS_PATH)")
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds to wait for the daemon's answer (default {DEFAULT_TIMEOUT:g}; libxl allows a script 40)",
    )
    add_sim_arg(p)
    p.set_defaults(func=run)


def absolute(backend: str, self_domid: int) -> str:
    """XENBUS_PATH is relative to the backend domain's home, as XenStore resolves relative paths."""
    return backend if backend.startswith("/") else f"{domain_path(self_domid)}/{backend.strip('/')}"


def run(args: argparse.Namespace, cfg: config.Config) -> int:
    from xenblk.backend import control
    from xenblk.errors import XenblkError

    backend = args.backend or os.environ.get("XENBUS_PATH", "")
    if not backend:
        raise XenblkError("hotplug: no backend dir (XENBUS_PATH is not set and no --backend given)")
    path = absolute(backend, cfg.daemon.domid)
    if args.timeout <= 0 or args.timeout > 600:
        raise XenblkError("hotplug: --timeout must be in (0, 600] seconds")
    # publish: the daemon writes hotplug-status / hotplug-error itself (as for block-xenblk's client)
    request = {"op": "take" if args.action == "add" else "release", "backend": path, "timeout": args.timeout,
               "publish": True}  # fmt: skip
    error: str | None = None
    answered = False
    try:
        reply = control.call(cfg.daemon.run_dir, request, timeout=args.timeout + 5)
        answered = True
        if not reply.get("ok"):
            error = str(reply.get("error") or "refused without a reason")
    except control.DaemonNotRunning as e:
        if args.action == "remove":
            return 0  # a daemon that is not running holds no image
        error = str(e)
    except (XenblkError, OSError, ValueError) as e:
        error = f"no answer from xenblk serve: {e}"

    if args.action == "remove":
        if error:
            print(f"block-xenblk remove {path}: {error}", file=sys.stderr)
            return 1
        return 0

    async def publish() -> None:
        from xenblk.xenstore import Transaction, XenStore

        async with XenStore.open(xenstore_path(cfg, args.sim), timeout=cfg.xenstore.timeout) as xs:

            async def body(t: Transaction) -> None:
                if await t.try_read(f"{path}/state") is None:
                    return  # removed meanwhile: never create B again
                await t.write(f"{path}/hotplug-error", (error or "")[:1000])
                await t.write(f"{path}/hotplug-status", "error")

            await xs.transact(body)

    try:
        if not answered:  # the daemon wrote nothing: the reason goes to B/hotplug-error from here
            asyncio.run(publish())
    except (XenblkError, OSError) as e:
        print(f"block-xenblk add {path}: cannot write the hotplug status to XenStore: {e}", file=sys.stderr)
        return 1
    if error is not None:
        print(f"block-xenblk add {path}: {error}", file=sys.stderr)
        return 1
    return 0
