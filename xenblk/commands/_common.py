"""Options shared by several subcommands, and the choice between real Xen and the sim host
(`--sim DIR`) that the commands make and hand down: nothing below them asks which it is."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from xenblk.config import Config

if TYPE_CHECKING:
    from xenblk.xenplatform import Platform


def add_sim_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sim",
        metavar="DIR",
        default=None,
        help="use the simulated Xen host started by `xenblk sim host --dir DIR` instead of real Xen",
    )


def xenstore_path(cfg: Config, sim_dir: str | None) -> str | None:
    """The xenstored socket: the sim host's, else [xenstore] path, else the client's default lookup."""
    if sim_dir is not None:
        from xenblk.sim.broker import read_host_json

        return str(read_host_json(sim_dir)["xenstored_path"])
    return cfg.xenstore.path or None


def open_platform(sim_dir: str | None, self_domid: int) -> Platform:
    """Real Xen's grants and event channels, or the sim host's in `sim_dir`."""
    if sim_dir is not None:
        from xenblk.sim.platform import SimPlatform

        return SimPlatform.open_dir(sim_dir, self_domid)
    from xenblk.xenplatform import RealPlatform

    return RealPlatform.open(self_domid)
