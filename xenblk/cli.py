"""The `xenblk` command line. Each subcommand lives in xenblk/commands/<name>.py
and registers itself through `register(subparsers)`; its handler gets the parsed
arguments and the loaded config and returns the exit status."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence
from pathlib import Path

from xenblk import __version__, config, log
from xenblk.errors import XenblkError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xenblk",
        description="Userspace Xen PV block backend for Dom0: serves blkfront guests from raw, qcow2, VHD and "
        "block-device images, on real Xen or on the embedded simulated host.",
    )
    p.add_argument("--version", action="version", version=f"xenblk {__version__}")
    p.add_argument("--config", type=Path, default=None, help=f"TOML config file (default {config.DEFAULT_PATH})")
    p.add_argument("--log-format", choices=["auto", "console", "json"], default=None, help="override log.format")
    p.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], default=None, help="override log.level"
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    import xenblk.commands as commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"xenblk.commands.{info.name}")
        mod.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        cfg = config.load(args.config)
        log.configure(args.log_format or cfg.log.format, args.log_level or cfg.log.level)
        rc: int = args.func(args, cfg)
        return rc
    except XenblkError as e:
        print(f"xenblk: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
