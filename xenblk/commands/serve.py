"""`xenblk serve`: the backend daemon."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from xenblk import config
from xenblk.commands._common import add_sim_arg, open_platform, xenstore_path


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run the backend daemon (real Xen unless --sim)",
        description="Watches /local/domain/<daemon.domid>/backend/<type>/ for every type in daemon.backend_types and "
        "serves each VBD found there (already present ones too) until SIGTERM/SIGINT, which drain and close every "
        "device (backend dirs stay, so the next start serves them again) and exit 0. SIGHUP reloads the config: "
        "log.*, storage.*, dataplane.* (for devices connecting afterwards) and metrics.*; daemon.* and xenstore.* "
        "need a restart. A backend dir with a `script` node (libxl, `script=block-xenblk`) gets InitWait before its "
        "image is opened; `xenblk hotplug add` (the hotplug script) then opens it or reports why not. With backend "
        "type vbd it refuses to start while the kernel's xen-blkback is loaded. Under systemd (Type=notify) it "
        "reports READY=1 once its XenStore watches are live and feeds "
        "the watchdog. The control socket for `xenblk list/resize` is <daemon.run_dir>/control.sock. SIGHUP "
        "also reloads nbd.* (for images opened afterwards).",
    )
    add_sim_arg(p)
    p.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        default=None,
        help="serve Prometheus metrics here instead of metrics.listen (port 0: any free port)",
    )
    p.add_argument("--no-uevents", action="store_true", help="do not listen to kernel uevents for block-device growth")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, cfg: config.Config) -> int:
    import uvloop

    from xenblk.backend.daemon import Daemon
    from xenblk.backend.dataplane_port import NativeDataplane

    if args.metrics_listen is not None:
        config.parse_listen(args.metrics_listen)
    sim = args.sim
    daemon = Daemon(
        cfg,
        xenstore_path=xenstore_path(cfg, sim),
        dataplane_factory=lambda: NativeDataplane(
            open_platform(sim, cfg.daemon.domid), journal_dir=cfg.daemon.state_dir
        ),
        config_path=args.config,
        metrics_listen=args.metrics_listen,
        uevents=not args.no_uevents,
        log_overrides=(args.log_format, args.log_level),
        sys_dir=Path(sim) / "sys" if sim else Path("/sys"),
    )
    # asyncio.Runner, not uvloop.run: Debian 12's python3-uvloop (0.17) has no uvloop.run.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(daemon.run())
