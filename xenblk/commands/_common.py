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


def _qos_option(key: str) -> str:
    """--iops-limit, --read-bps-limit ... for a rate; --iops-burst ... for a burst (xenblk.qos.KEYS)."""
    return f"--{key}" if key.endswith("-burst") else f"--{key}-limit"


def add_qos_args(p: argparse.ArgumentParser, *, group: bool = True) -> None:
    """The QoS options (README, "QoS"): written as the backend node's qos/ keys."""
    from xenblk.qos import KEYS

    g = p.add_argument_group("QoS limits (per second; 0 = unlimited; bytes take K/M/G/T, powers of 1024)")
    for key in KEYS:
        what = "requests" if "iops" in key else "bytes"
        op = key.split("-")[0] if key.split("-")[0] in ("read", "write") else "all"
        if key.endswith("-burst"):
            hlp = f"{what} ({op}) let through at once after idleness, on top of the rate (default: a tenth of it)"
        else:
            hlp = f"{what} per second ({op})"
        g.add_argument(_qos_option(key), dest=f"qos_{key.replace('-', '_')}", metavar="N", default=None, help=hlp)
    if group:
        g.add_argument(
            "--qos-group",
            metavar="NAME",
            default=None,
            help='share limits with other disks of group NAME ("domain": the disks of this domain); the group\'s '
            "limits: `xenblk qos --group NAME`",
        )


def qos_from_args(args: argparse.Namespace) -> dict[str, str]:
    """The qos/ keys the options set, as XenStore values (checked: a bad one is a XenblkError)."""
    from xenblk.qos import DOMAIN_GROUP, KEYS, check_group, parse_cli_limit

    out: dict[str, str] = {}
    for key in KEYS:
        v = getattr(args, f"qos_{key.replace('-', '_')}", None)
        if v is not None:
            out[key] = str(parse_cli_limit(_qos_option(key).lstrip("-"), v))
    grp = getattr(args, "qos_group", None)
    if grp is not None:
        out["group"] = grp if grp in ("", DOMAIN_GROUP) else check_group(grp)
    return out
