"""`xenblk stats`: a live per-disk table fed by the daemon's metrics endpoint."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from xenblk import config, statsview


def register(sub: Any) -> None:
    p = sub.add_parser("stats", help="per-disk IOPS, MB/s, latency percentiles, in-flight and errors")
    p.add_argument("--url", default=None, help="metrics endpoint (default: http://<metrics.listen>/metrics)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between the two samples of a rate")
    p.add_argument("--watch", action="store_true", help="refresh until interrupted")
    p.add_argument("--json", action="store_true", help="print JSON rows")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, cfg: config.Config) -> int:
    host, port = config.parse_listen(cfg.metrics.listen)
    url = args.url or f"http://{host}:{port}/metrics"
    prev = statsview.parse(statsview.fetch(url), time.monotonic())
    while True:
        time.sleep(max(args.interval, 0.05))
        cur = statsview.parse(statsview.fetch(url), time.monotonic())
        table = statsview.rows(prev, cur)
        if args.json:
            print(json.dumps([r.as_dict() for r in table]), flush=True)
        else:
            if args.watch and sys.stdout.isatty():
                print("\033[H\033[2J", end="")
            print(statsview.format_table(table), flush=True)
        if not args.watch:
            return 0
        prev = cur
