"""The body of /etc/xen/scripts/block-xenblk: `python3 -I -S hotplug_client.py add|remove`.

libxl kills a hotplug script after 40 s. `xenblk hotplug` imports the CLI (structlog, asyncio, every
subcommand): in a Dom0 under software emulation on a busy machine that start alone took over 40 s,
and `xl create` failed. This client is what the script runs instead: the standard library only
(json, os, socket, sys, tomllib), no site-packages, one request on the daemon's control socket. The
daemon does the rest: "take" with "publish" opens the image (or refuses it) and writes
hotplug-status=connected or hotplug-error=<reason> in the backend dir itself, in one transaction;
"release" returns once the image is closed. Exit 0, or 1 with the reason on stderr (libxl logs it).

Env: XENBUS_PATH (from libxl), XENBLK_CONFIG (default /etc/xenblk/xenblk.toml: daemon.run_dir and
daemon.domid are read from it). Same protocol as `xenblk hotplug` (xenblk/commands/hotplug.py).
"""

import json
import os
import socket
import sys

CONFIG = "/etc/xenblk/xenblk.toml"
RUN_DIR = "/run/xenblk"  # daemon.run_dir's default (tests/test_hotplug.py checks it against xenblk.config)
TIMEOUT = 30.0  # answer well within libxl's 40 s


def daemon_settings(path: str) -> tuple[str, int]:
    """daemon.run_dir and daemon.domid of the config file (their defaults if it has none)."""
    try:
        with open(path, "rb") as f:
            import tomllib

            daemon = tomllib.load(f).get("daemon", {})
    except FileNotFoundError:
        daemon = {}
    return str(daemon.get("run_dir", RUN_DIR)), int(daemon.get("domid", 0))


def call(run_dir: str, request: dict, timeout: float) -> dict:  # type: ignore[type-arg]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(os.path.join(run_dir, "control.sock"))
        s.sendall(json.dumps(request).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise OSError("xenblk serve closed the control connection")
            buf += chunk
    reply = json.loads(buf)
    if not isinstance(reply, dict):
        raise ValueError("xenblk serve sent a malformed reply")
    return reply


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in ("add", "remove"):
        print("usage: block-xenblk add|remove (run by libxl with XENBUS_PATH set)", file=sys.stderr)
        return 2
    action = argv[1]
    backend = os.environ.get("XENBUS_PATH", "")
    if not backend:
        print(f"block-xenblk {action}: XENBUS_PATH is not set", file=sys.stderr)
        return 1
    try:
        run_dir, domid = daemon_settings(os.environ.get("XENBLK_CONFIG") or CONFIG)
    except (OSError, ValueError) as e:
        print(f"block-xenblk {action}: cannot read the xenblk config: {e}", file=sys.stderr)
        return 1
    # XENBUS_PATH is relative to the backend domain's home, as XenStore resolves relative paths
    path = backend if backend.startswith("/") else f"/local/domain/{domid}/{backend.strip('/')}"
    op = "take" if action == "add" else "release"
    try:
        reply = call(run_dir, {"op": op, "backend": path, "timeout": TIMEOUT, "publish": True}, TIMEOUT + 5)
        error = None if reply.get("ok") else str(reply.get("error") or "refused without a reason")
    except (FileNotFoundError, ConnectionRefusedError):
        if action == "remove":
            return 0  # a daemon that is not running holds no image
        error = f"xenblk serve is not running (no control socket in {run_dir})"
    except (OSError, ValueError) as e:
        error = f"no answer from xenblk serve: {e}"
    if error is None:
        return 0
    # with an answer, the daemon wrote hotplug-error; without one, libxl reports the script's failure
    print(f"block-xenblk {action} {path}: {error}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
