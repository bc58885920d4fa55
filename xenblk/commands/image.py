"""`xenblk image info|check PATH`: what an image is, and whether its metadata is consistent."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from xenblk import config
from xenblk.storage import FORMATS, Image


def register(sub: Any) -> None:
    p = sub.add_parser("image", help="inspect an image file or device (info, check)")
    isub = p.add_subparsers(dest="image_command", metavar="ACTION", required=True)
    for name, helptext in (
        ("info", "format, virtual size, cluster size, backing chain, allocation"),
        ("check", "the driver's consistency check (qcow2: leaked and corrupt clusters; vhd: blocks)"),
    ):
        q = isub.add_parser(name, help=helptext)
        q.add_argument("path", metavar="PATH")
        q.add_argument(
            "--format",
            "-f",
            choices=sorted(FORMATS),
            default=None,
            help="image format (default: raw, block for a device)",
        )
        q.add_argument(
            "--backing-dir",
            action="append",
            default=[],
            metavar="DIR",
            help="also accept qcow2 backing files and VHD parents under DIR (besides storage.backing_dirs; "
            "repeatable); "
            "backing files are regular files opened beneath such a directory without following symlinks",
        )
        q.add_argument("--json", action="store_true", help="print JSON")
        if name == "check":
            q.add_argument(
                "--repair-leaks",
                action="store_true",
                help="give back leaked clusters (as `qemu-img check -r leaks`); opens the image read-write, so "
                "only while no daemon serves it; an image with corruptions is left untouched (exit 2)",
            )
        q.set_defaults(func=run)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _print_info(info: dict[str, Any], indent: str = "") -> None:
    print(f"{indent}image: {info['filename']}")
    print(f"{indent}format: {info['format']}")
    print(f"{indent}virtual size: {_human(info['virtual_size'])} ({info['virtual_size']} bytes)")
    print(f"{indent}allocated: {_human(info['allocated_bytes'])}")
    if "cluster_size" in info:
        print(f"{indent}cluster size: {info['cluster_size']}")
        print(f"{indent}qcow2 version: {info['qcow2_version']}, refcount bits: {info['refcount_bits']}")
    if "vhd_type" in info:
        block = f", block size {info['block_size']}" if "block_size" in info else ""
        print(f"{indent}vhd type: {info['vhd_type']}{block}")
    if "backing_file" in info:
        print(f"{indent}backing file: {info['backing_file']} (format {info['backing_format']})")
        if "backing" in info:
            _print_info(info["backing"], indent + "  ")


def run(args: argparse.Namespace, cfg: config.Config) -> int:
    # The same rules as the daemon's for what the image names (it may be a tenant's): backing
    # files only from storage.backing_dirs (and --backing-dir), never a device, FIFO or socket;
    # the image itself is what the admin named, opened without blocking on a FIFO.
    backing_dirs = [*cfg.storage.backing_dirs, *(os.path.abspath(d) for d in args.backing_dir)]
    repair = getattr(args, "repair_leaks", False)
    with Image.open(args.path, args.format, readonly=not repair, backing_dirs=backing_dirs) as img:
        if args.image_command == "info":
            info = img.info()
            if args.json:
                print(json.dumps(info, indent=2))
            else:
                _print_info(info)
            return 0
        res = img.check()
        if repair and res["leaks"] and not res["corruptions"]:
            res["repaired_leaks"] = img.repair_leaks()
            res["leaks"] = img.check()["leaks"]
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        if res.get("repaired_leaks"):
            print(f"{args.path}: repaired {res['repaired_leaks']} leaked clusters")
        print(f"{args.path}: {res['corruptions']} corruptions, {res['leaks']} leaked clusters")
        if res["format"] == "qcow2":
            print(f"{res['allocated_clusters']}/{res['total_clusters']} clusters allocated")
        elif res["format"] == "vhd" and res["total_clusters"]:
            print(f"{res['allocated_clusters']}/{res['total_clusters']} blocks allocated")
        print("no errors found" if res["corruptions"] == 0 and res["leaks"] == 0 else "errors found")
    if res["corruptions"]:
        return 2
    return 3 if res["leaks"] else 0
