"""`make deb` (packaging/build-deb.sh): the package's metadata and contents, then the package itself,
unpacked into a throwaway root, run by this release's /usr/bin/python3 on Debian's own python3-*
packages: --help/--version, the unit passes `systemd-analyze verify`, and the packaged daemon and
hotplug script serve a simulated guest's verified I/O."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_hotplug import running_host, verified_io

ROOT = Path(__file__).resolve().parent.parent
SYSPY = "/usr/bin/python3"
PKGDIR = "usr/lib/python3/dist-packages"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
PY_DEPS = ["python3-cffi-backend", "python3-uvloop", "python3-structlog", "python3-prometheus-client",
           "python3-pyroute2"]  # fmt: skip


def sys_py_version() -> str:
    return subprocess.run([SYSPY, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("deb")
    r = subprocess.run(["packaging/build-deb.sh"], cwd=ROOT, env={**os.environ, "DEB_OUT": str(out)},
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip()
    path = out / f"xenblk_{VERSION}_{arch}.deb"
    assert r.stdout.strip().endswith(path.name) and path.is_file(), r.stdout
    yield path


@pytest.fixture(scope="module")
def rbd_deb(deb: Path) -> Path:
    """xenblk-rbd, built beside xenblk wherever librbd-dev is installed (scripts/setup.sh installs it)."""
    if not Path("/usr/include/rbd/librbd.h").exists():
        pytest.skip("librbd-dev is not installed: build-deb.sh builds no xenblk-rbd")
    path = deb.with_name(deb.name.replace("xenblk_", "xenblk-rbd_", 1))
    assert path.is_file(), sorted(p.name for p in deb.parent.iterdir())
    return path


@pytest.fixture(scope="module")
def root(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("root")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(d)], check=True)
    return d


def field(info: str, name: str) -> str:
    m = re.search(rf"^ {name}: (.*)$", info, re.MULTILINE)
    assert m, f"no {name} in\n{info}"
    return m.group(1)


def test_control_fields_and_dependencies_exist_in_this_release(deb: Path) -> None:
    info = subprocess.run(["dpkg-deb", "-I", str(deb)], capture_output=True, text=True, check=True).stdout
    assert field(info, "Package") == "xenblk"
    assert field(info, "Version") == VERSION
    depends = [d.strip() for d in field(info, "Depends").split(",")]
    pyver = sys_py_version()
    major, minor = pyver.split(".")
    # built for this release's python3 only (the native modules carry its version)
    assert f"python3 (>= {pyver}~)" in depends and f"python3 (<< {major}.{int(minor) + 1})" in depends
    names = {d.split()[0] for d in depends}
    assert set(PY_DEPS) <= names
    for pkg in names:
        r = subprocess.run(["apt-cache", "show", pkg], capture_output=True, text=True)
        assert r.returncode == 0 and f"Package: {pkg}" in r.stdout, f"{pkg} is not a package of this release"
    conffiles = subprocess.run(["dpkg-deb", "-I", str(deb), "conffiles"], capture_output=True, text=True).stdout
    assert conffiles.split() == ["/etc/xenblk/xenblk.toml", "/etc/xen/scripts/block-xenblk"]
    for script in ("postinst", "prerm", "postrm"):
        text = subprocess.run(["dpkg-deb", "-I", str(deb), script], capture_output=True, text=True).stdout
        assert subprocess.run(["sh", "-n"], input=text, text=True).returncode == 0, script


def test_contents(deb: Path, root: Path) -> None:
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    rows = {line.split()[-1]: line.split()[0] for line in listing.splitlines()}
    suffix = subprocess.run([SYSPY, "-c", "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))"],
                            capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    want = {
        "./usr/bin/xenblk": "-rwxr-xr-x",
        "./etc/xen/scripts/block-xenblk": "-rwxr-xr-x",
        "./etc/xenblk/xenblk.toml": "-rw-r--r--",
        "./usr/lib/systemd/system/xenblk.service": "-rw-r--r--",
        f"./{PKGDIR}/xenblk/cli.py": "-rw-r--r--",
        f"./{PKGDIR}/xenblk/commands/hotplug.py": "-rw-r--r--",
        "./usr/share/doc/xenblk/copyright": "-rw-r--r--",
        **{f"./{PKGDIR}/xenblk/{m}{suffix}": "-rw-r--r--" for m in ("_storage", "_dataplane", "_simguest")},
    }
    for path, mode in want.items():
        assert rows.get(path) == mode, (path, rows.get(path))
    assert all(" root/root " in line for line in listing.splitlines())
    assert not [p for p in rows if "__pycache__" in p or p.endswith(".pyc")]
    # the shipped config is the code's defaults, every key commented out: it parses to the defaults
    sys.path.insert(0, str(ROOT))
    from xenblk import config

    toml = (root / "etc/xenblk/xenblk.toml").read_text()
    assert config.from_dict(tomllib.loads(toml)) == config.Config()
    assert "# qcow2_dirs = []" in toml and "# allowed_dirs = " in toml


def test_native_modules_need_only_packaged_libraries(deb: Path, root: Path) -> None:
    info = subprocess.run(["dpkg-deb", "-I", str(deb)], capture_output=True, text=True, check=True).stdout
    names = {d.split()[0] for d in field(info, "Depends").split(",")}
    for so in (root / PKGDIR / "xenblk").glob("*.so"):
        for line in subprocess.run(["ldd", str(so)], capture_output=True, text=True, check=True).stdout.splitlines():
            m = re.search(r"=> (/\S+)", line)
            if not m:
                continue
            owner = subprocess.run(["dpkg-query", "-S", m.group(1)], capture_output=True, text=True)
            if owner.returncode != 0:
                owner = subprocess.run(["dpkg-query", "-S", os.path.realpath(m.group(1))], capture_output=True,
                                       text=True)  # fmt: skip
            pkg = owner.stdout.split(":")[0]
            assert pkg in names, f"{so.name} needs {m.group(1)} from {pkg}, not in Depends"


def needed_packages(so: Path) -> set[str]:
    """The packages of the libraries `so` names (DT_NEEDED), as the loader finds them."""
    dyn = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True, check=True).stdout
    needed = set(re.findall(r"\(NEEDED\).*\[(.*)\]", dyn))
    out = set()
    for line in subprocess.run(["ldd", str(so)], capture_output=True, text=True, check=True).stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] in needed and parts[1] == "=>":
            owner = subprocess.run(["dpkg-query", "-S", os.path.realpath(parts[2])], capture_output=True, text=True)
            if owner.returncode != 0:
                owner = subprocess.run(["dpkg-query", "-S", parts[2]], capture_output=True, text=True, check=True)
            out.add(owner.stdout.split(":")[0])
            needed.discard(parts[0])
    assert not needed, f"{so.name}: {needed} not found by the loader"
    return out


def test_rbd_package_holds_the_rbd_driver_and_depends_on_librbd(deb: Path, rbd_deb: Path) -> None:
    """The RBD driver is a package of its own (librbd1 and librados2 are ~25 MB most Xen hosts never use):
    xenblk-rbd = xenblk._rbd for exactly this xenblk, depending on this release's librbd1; xenblk Suggests it."""
    info = subprocess.run(["dpkg-deb", "-I", str(rbd_deb)], capture_output=True, text=True, check=True).stdout
    assert field(info, "Package") == "xenblk-rbd" and field(info, "Version") == VERSION
    depends = [d.strip() for d in field(info, "Depends").split(",")]
    assert f"xenblk (= {VERSION})" in depends
    names = {d.split()[0] for d in depends}
    assert {"librbd1", "librados2"} <= names
    for pkg in names - {"xenblk"}:
        r = subprocess.run(["apt-cache", "show", pkg], capture_output=True, text=True)
        assert r.returncode == 0 and f"Package: {pkg}" in r.stdout, f"{pkg} is not a package of this release"
    main = subprocess.run(["dpkg-deb", "-I", str(deb)], capture_output=True, text=True, check=True).stdout
    assert "xenblk-rbd" in field(main, "Suggests") and "librbd1" not in field(main, "Depends")
    listing = subprocess.run(["dpkg-deb", "-c", str(rbd_deb)], capture_output=True, text=True, check=True).stdout
    files = sorted(line.split()[-1] for line in listing.splitlines() if not line.startswith("d"))
    suffix = subprocess.run([SYSPY, "-c", "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))"],
                            capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert files == [f"./{PKGDIR}/xenblk/_rbd{suffix}", "./usr/share/doc/xenblk-rbd/changelog.gz",
                     "./usr/share/doc/xenblk-rbd/copyright"], files  # fmt: skip
    assert all(" root/root " in line for line in listing.splitlines())
    main_files = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    assert "_rbd" not in main_files


def test_rbd_driver_loads_with_its_package_and_says_so_without(root: Path, deb: Path, rbd_deb: Path,
                                                                tmp_path: Path) -> None:  # fmt: skip
    both = tmp_path / "both"
    for d in (deb, rbd_deb):
        subprocess.run(["dpkg-deb", "-x", str(d), str(both)], check=True)
    so = next((both / PKGDIR / "xenblk").glob("_rbd*.so"))
    info = subprocess.run(["dpkg-deb", "-I", str(rbd_deb)], capture_output=True, text=True, check=True).stdout
    assert needed_packages(so) <= {d.split()[0] for d in field(info, "Depends").split(",")}
    probe = (
        "from xenblk import rbd\n"
        "from xenblk.config import RbdConfig\n"
        "from xenblk.storage import StorageError\n"
        "from xenblk.xen.params import parse_rbd\n"
        "why = rbd.unavailable()\n"
        "print('unavailable:', why)\n"
        "if why is None:\n"
        "    try:\n"
        "        rbd.open_image(parse_rbd('p/i'), RbdConfig(allowed_pools=['p'], conf_file='/nonexistent/ceph.conf'))\n"
        "    except StorageError as e:\n"
        "        print('open:', e)\n"
    )
    # xenblk alone: an rbd: disk is refused with the package to install
    alone = subprocess.run([SYSPY, "-c", probe], capture_output=True, text=True, env=packaged_env(root), cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr
    assert "not available" in alone.stdout and "install the xenblk-rbd package" in alone.stdout, alone.stdout
    # with xenblk-rbd: librbd is loaded and reached (no cluster here: the conf file is missing)
    with_rbd = subprocess.run([SYSPY, "-c", probe], capture_output=True, text=True, env=packaged_env(both),
                              cwd=tmp_path)  # fmt: skip
    assert with_rbd.returncode == 0, with_rbd.stderr
    assert "unavailable: None" in with_rbd.stdout, with_rbd.stdout
    want = "open: rbd:p/i: reading /nonexistent/ceph.conf: No such file or directory"
    assert want in with_rbd.stdout, with_rbd.stdout


def packaged_env(root: Path) -> dict[str, str]:
    """The system python3 sees the package as if installed: its dist-packages dir first, no venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH")}
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
    env["PYTHONPATH"] = str(root / PKGDIR)
    return env


def test_cli_runs_on_the_system_python(root: Path, tmp_path: Path) -> None:
    env = packaged_env(root)
    xb = str(root / "usr/bin/xenblk")
    assert Path(xb).read_text().startswith(f"#!{SYSPY}\n")
    v = subprocess.run([xb, "--version"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert v.returncode == 0 and v.stdout.strip() == f"xenblk {VERSION}", v.stdout + v.stderr
    h = subprocess.run([xb, "--help"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert h.returncode == 0 and "hotplug" in h.stdout and "serve" in h.stdout, h.stdout + h.stderr
    where = subprocess.run(
        [SYSPY, "-c", "import xenblk, xenblk._storage, xenblk._dataplane, uvloop, structlog; print(xenblk.__file__)"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip() == str(root / PKGDIR / "xenblk" / "__init__.py")


def test_installed_unit_passes_systemd_analyze_verify(root: Path, tmp_path: Path) -> None:
    text = (root / "usr/lib/systemd/system/xenblk.service").read_text()
    assert "ExecStart=/usr/bin/xenblk serve\n" in text and "/usr/local" not in text
    # verify needs ExecStart's binary to exist here: point it at the unpacked one, nothing else changes
    unit = tmp_path / "xenblk.service"
    unit.write_text(text.replace("ExecStart=/usr/bin/xenblk ", f"ExecStart={root}/usr/bin/xenblk "))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=120)
    complaints = [line for line in (r.stdout + r.stderr).splitlines() if "xenblk.service" in line]
    assert complaints == [], complaints


# xenblk.service has MemoryDenyWriteExecute=yes: no memory may be writable and executable (cffi's
# ffi.callback needs such memory, extern "Python" does not). Where the kernel has PR_SET_MDWE (6.3+), the
# packaged daemon runs under it here, as under systemd; EINVAL (an older kernel) runs it without.
MDWE_EXEC = (
    "import ctypes, os, sys\n"
    "r = ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0)  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN\n"
    "assert r == 0 or ctypes.get_errno() == 22, os.strerror(ctypes.get_errno())\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


def test_packaged_daemon_and_hotplug_script_serve_a_guest(root: Path, tmp_path: Path, sim_dir: Path) -> None:
    """Debian's python3-uvloop/-structlog/-prometheus-client/-pyroute2 of this release run the daemon:
    the packaged `xenblk serve` (under MemoryDenyWriteExecute, see MDWE_EXEC) on the sim host, the packaged
    block-xenblk adds a disk, a guest verifies; kernel uevents through Debian's pyroute2."""
    env = packaged_env(root)
    script = root / "etc/xen/scripts/block-xenblk"
    xenblk = [SYSPY, "-c", MDWE_EXEC, str(root / "usr/bin/xenblk")]
    # RBD pools configured, the xenblk-rbd package not installed (this root has xenblk alone): said at start
    rbd = '[rbd]\nallowed_pools = ["vms"]\n'
    with running_host(tmp_path, sim_dir, xenblk, env, script, uevents=True, extra_config=rbd) as host:
        maps = Path(f"/proc/{host.stack.serve.pid}/maps").read_text()
        assert f"{root}/{PKGDIR}/xenblk/_dataplane" in maps  # the packaged modules, not the checkout's
        assert os.path.realpath(f"/proc/{host.stack.serve.pid}/exe") == os.path.realpath(SYSPY)
        image = host.stack.images / "a.raw"
        subprocess.run(["truncate", "-s", "16M", str(image)], check=True)
        # and a qcow2 over a backing file: opening the chain calls back into Python from C
        base, q = host.stack.images / "base" / "base.raw", host.stack.images / "qcow2" / "over.img"
        subprocess.run(["truncate", "-s", "16M", str(base)], check=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(q)], check=True)
        xps = [host.write_libxl_disk(8, "xvdb", f"aio:{image}"), host.write_libxl_disk(8, "xvdc", f"aio:{q}")]
        for xp in xps:
            host.wait_state(xp, "2")
            r = host.hotplug("add", xp)
            assert r.returncode == 0, r.stderr + host.stack.log_tail()
            assert host.read(f"/local/domain/0/{xp}/hotplug-status") == "connected"
        assert {d["vdev"]: d["format"] for d in host.served()} == {"xvdb": "raw", "xvdc": "qcow2"}
        verified_io(host, 8)
        for xp in xps:
            assert host.libxl_remove(xp, 8).returncode == 0
        host.wait_gone(8)
        # Debian's python3-pyroute2 listens to kernel uevents for block-device growth
        log = host.stack.serve_log.read_text()
        assert '"event": "uevents.listening"' in log, host.stack.log_tail()
        warned = [json.loads(line) for line in log.splitlines() if '"daemon.rbd_unavailable"' in line]
        assert len(warned) == 1 and "install the xenblk-rbd package" in warned[0]["error"], log
