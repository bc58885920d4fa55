"""`make demo`: the whole product on the embedded simulated host, end to end.

Starts the simulated Xen host (real xenstored + grant/event broker), `xenblk serve`,
attaches a qcow2 (over a raw backing file) and a raw image to a simulated guest with
`xenblk attach`, runs a short verified workload through the real blkif rings, and
prints what an operator wants to see. Everything is cleaned up afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from xenblk.sim.xenstored import find_xenstored

XENBLK = [sys.executable, "-m", "xenblk"]
DOMID = 1


def say(msg: str) -> None:
    print(f"\n\033[1m== {msg}\033[0m" if sys.stdout.isatty() else f"\n== {msg}", flush=True)


def run(args: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    print("$ xenblk " + " ".join(args[len(XENBLK) :]) if args[: len(XENBLK)] == XENBLK else "$ " + " ".join(args))
    r = subprocess.run(args, text=True, capture_output=True, **kw)  # type: ignore[call-overload]
    if r.stdout:
        print(r.stdout, end="")
    if r.returncode != 0:
        print(r.stderr, end="", file=sys.stderr)
        raise SystemExit(f"demo: `{' '.join(args)}` failed with status {r.returncode}")
    return r  # type: ignore[no-any-return]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# The waits below are failure bounds only, generous for a loaded machine: each returns as soon as its
# condition holds.
def wait_for(path: Path, proc: subprocess.Popen[bytes], what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise SystemExit(f"demo: {what} exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: {what} did not become ready in {timeout:.0f}s")
        time.sleep(0.1)


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"demo: xenblk serve exited with status {proc.returncode}") from None
            if time.monotonic() > deadline:
                raise SystemExit(f"demo: metrics endpoint {url} did not answer") from None
            time.sleep(0.2)


def wait_connected(cfg: Path, sim: Path, guest: subprocess.Popen[str], n: int, timeout: float = 300) -> None:
    """Until `n` disks are Connected (the guest has done its handshake), so the table shows them live."""
    deadline = time.monotonic() + timeout
    while guest.poll() is None:
        r = subprocess.run([*XENBLK, "--config", str(cfg), "list", "--json", "--sim", str(sim)],
                           capture_output=True, text=True)  # fmt: skip
        if r.returncode == 0 and sum(row["state"] == 4 for row in json.loads(r.stdout)) >= n:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: the guest's {n} disks were not Connected within {timeout:.0f}s")
        time.sleep(0.2)
    raise SystemExit(f"demo: the simulated guest exited with status {guest.returncode} before connecting")


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main() -> int:
    return full_demo()


def full_demo() -> int:
    work = Path(tempfile.mkdtemp(prefix="xenblk-demo."))
    sim, images, bases = work / "sim", work / "images", work / "base"
    images.mkdir(parents=True)
    bases.mkdir()
    port = free_port()
    cfg = work / "xenblk.toml"
    cfg.write_text(
        f'[daemon]\nrun_dir = "{work}/run"\nstate_dir = "{work}/state"\n'
        # backing files only from a base-image directory of their own, never from the images' one
        f'[storage]\nallowed_dirs = ["{images}"]\nbacking_dirs = ["{bases}"]\n'
        f'[metrics]\nlisten = "127.0.0.1:{port}"\n'
        '[log]\nformat = "console"\nlevel = "info"\n'
    )
    host = serve = None
    try:
        say(f"simulated Xen host: the real xenstored ({find_xenstored()}) + the grant/event broker")
        host = subprocess.Popen([*XENBLK, "sim", "host", "--dir", str(sim)], stdout=subprocess.DEVNULL)
        wait_for(sim / "host.json", host, "xenblk sim host")
        print(f"host ready in {sim}: {json.loads((sim / 'host.json').read_text())['xenstored_path']}")

        say("images: a qcow2 over a raw backing file, and a raw file")
        base, qcow, raw = bases / "base.raw", images / "disk.qcow2", images / "data.raw"
        run(["qemu-img", "create", "-q", "-f", "raw", str(base), "256M"])
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(qcow), "256M"])
        run(["truncate", "-s", "256M", str(raw)])

        say("xenblk serve --sim (the daemon, as systemd would run it)")
        log = open(work / "serve.log", "wb")  # noqa: SIM115
        serve = subprocess.Popen(
            [*XENBLK, "--config", str(cfg), "serve", "--sim", str(sim)], stdout=log, stderr=subprocess.STDOUT
        )
        metrics_url = f"http://127.0.0.1:{port}/metrics"
        wait_http(metrics_url, serve)

        say("xenblk attach: write the frontend and backend nodes for guest 1")
        for image, vdev in ((f"qcow2:{qcow}", "xvdb"), (str(raw), "xvdc")):
            # --wait=initwait: returns once the daemon has opened the image and waits for the guest
            run([*XENBLK, "--config", str(cfg), "attach", str(DOMID), image, "--vdev", vdev, "--wait=initwait",
                 "--sim", str(sim)])  # fmt: skip

        say("simulated guest: blkfront handshake, then a verified random-write + read-back workload")
        # it runs until stopped (after the table and the stats below), so they always show it live
        guest = subprocess.Popen(
            [*XENBLK, "sim", "guest", "--dir", str(sim), "--domid", str(DOMID), "--rw", "randrw", "--bs", "4k",
             "--iodepth", "16", "--until-stopped", "--verify", "--seed", "7", "--queues", "2",
             "--ring-order", "2", "--indirect", "--json"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        wait_connected(cfg, sim, guest, 2)
        say("xenblk list, while the guest runs")
        run([*XENBLK, "--config", str(cfg), "list", "--sim", str(sim)])
        say("xenblk stats: IOPS and latency percentiles from the metrics endpoint")
        run([*XENBLK, "--config", str(cfg), "stats", "--interval", "1"])
        guest.send_signal(signal.SIGTERM)  # a graceful stop: in-flight I/O answered, then the results
        out, _ = guest.communicate(timeout=600)
        if guest.returncode != 0:
            print(out)
            raise SystemExit(f"demo: the simulated guest failed (status {guest.returncode})")
        say("guest results (verified: every byte written was read back intact)")
        print_guest_results(out)
        say("metrics")
        text = urllib.request.urlopen(metrics_url).read().decode()
        shown = [ln for ln in text.splitlines() if ln.startswith(("xenblk_requests_total", "xenblk_device_state"))]
        print("\n".join(shown[:12]))
        print(f"\nPrometheus endpoint: {metrics_url}  (Grafana dashboard: contrib/grafana/xenblk.json)")
        say("qemu-img check on the qcow2 the guest wrote")
        stop(serve)
        serve = None
        run(["qemu-img", "check", str(qcow)])
        print("\ndemo: done")
        return 0
    finally:
        stop(serve)
        stop(host)
        if not os.environ.get("XENBLK_DEMO_KEEP"):
            subprocess.run(["rm", "-rf", str(work)], check=False)
        else:
            print(f"demo: kept {work}")


def print_guest_results(out: str) -> None:
    try:
        data = json.loads(out)
    except json.JSONDecodeError:
        print(out)
        return
    disks = data.get("disks", data) if isinstance(data, dict) else data
    if isinstance(disks, dict):
        disks = list(disks.values())
    print(
        f"{'VDEV':<6} {'IOPS':>9} {'MB/s':>8} {'p50(us)':>9} {'p99(us)':>9} "
        f"{'p99.9(us)':>10} {'ERRORS':>7} {'VERIFY':>7}"
    )
    for d in disks:
        lat = d.get("latency_us", d)
        print(
            f"{d.get('vdev', '?'):<6} {d.get('iops', 0):>9.0f} {d.get('mbps', d.get('mb_s', 0)):>8.1f} "
            f"{lat.get('p50', 0):>9.0f} {lat.get('p99', 0):>9.0f} {lat.get('p99.9', lat.get('p999', 0)):>10.0f} "
            f"{d.get('errors', 0):>7} {d.get('verify_errors', 0):>7}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
