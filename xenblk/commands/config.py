"""`xenblk config`: show the defaults or check a config file."""

from __future__ import annotations

import argparse
from typing import Any

from xenblk import config


def register(sub: Any) -> None:
    p = sub.add_parser("config", help="print the default config, or check the loaded one")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--defaults", action="store_true", help="print every key with its default, as TOML")
    g.add_argument("--check", action="store_true", help="load --config and report whether it is valid")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, cfg: config.Config) -> int:
    if args.check:
        print(f"config ok: {args.config or config.DEFAULT_PATH}")
        return 0
    print(config.defaults_toml(), end="")
    return 0
