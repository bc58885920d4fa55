"""Options shared by several subcommands."""

from __future__ import annotations

import argparse


def add_sim_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sim",
        metavar="DIR",
        default=None,
        help="use the simulated Xen host started by `xenblk sim host --dir DIR` instead of real Xen",
    )
