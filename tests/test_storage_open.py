"""How images are opened (issue #14 item 4): once, beneath their directory, no symlink followed,
never blocking on a FIFO, and the fd that was checked is the fd the driver uses. `xenblk image
info/check` follow the same rules for backing files."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fixtures.storage import qemu_img
from xenblk.backend.imagespec import ImageSpecError, open_image, parse_params
from xenblk.storage import Image, StorageError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=[False, True], ids=["openat2", "walk"])
def walk(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def test_open_beneath_refuses_links_escapes_and_absolute_names(tmp_path: Path, walk: bool) -> None:
    from xenblk.storage import open_beneath

    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "f").write_bytes(b"inside")
    (tmp_path / "secret").write_bytes(b"outside")
    (d / "link").symlink_to(tmp_path / "secret")
    (d / "dirlink").symlink_to(d / "sub")
    (d / "proc").symlink_to("/proc/self/root/etc/hostname")
    dirfd = os.open(d, os.O_PATH | os.O_DIRECTORY)
    try:
        fd = open_beneath(dirfd, "sub/f", os.O_RDONLY, walk=walk)
        assert os.read(fd, 10) == b"inside"
        os.close(fd)
        for rel, want in (
            ("link", errno.ELOOP),
            ("dirlink/f", errno.ELOOP),
            ("proc", errno.ELOOP),
            ("../secret", errno.EXDEV),
            ("sub/../../secret", errno.EXDEV),
            (str(tmp_path / "secret"), errno.EXDEV),
        ):
            with pytest.raises(OSError) as ei:
                os.close(open_beneath(dirfd, rel, os.O_RDONLY, walk=walk))
            assert ei.value.errno == want, (rel, ei.value)
    finally:
        os.close(dirfd)


def test_a_symlink_inside_allowed_dirs_is_refused(tmp_path: Path) -> None:
    # The old check took the realpath, so a link to another file in the same directory passed
    # (and the link could be swapped before the reopen by path).
    images = tmp_path / "images"
    images.mkdir()
    (images / "other-tenant.raw").write_bytes(b"x" * 4096)
    (images / "mine.raw").symlink_to(images / "other-tenant.raw")
    with pytest.raises(ImageSpecError, match="symbolic link"):
        open_image(parse_params(str(images / "mine.raw"), "r"), [str(images)], "writeback")
    (images / "sub").symlink_to(images)
    with pytest.raises(ImageSpecError, match="symbolic link"):
        open_image(parse_params(str(images / "sub" / "other-tenant.raw"), "r"), [str(images)], "writeback")
    img = open_image(parse_params(f"aio:{images}/./x/../other-tenant.raw", "r"), [str(images)], "writeback")
    img.close()


def test_fifo_and_socket_images_are_refused_without_blocking(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    os.mkfifo(images / "pipe.raw")
    with pytest.raises(ImageSpecError, match="is a FIFO"):
        open_image(parse_params(str(images / "pipe.raw"), "w"), [str(images)], "writeback")
    with pytest.raises(StorageError, match="is a FIFO"):
        Image.open(str(images / "pipe.raw"))


def _xenblk(cfg: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    if not cfg.exists():
        cfg.write_text("")  # all defaults, whatever /etc/xenblk holds
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    argv = [sys.executable, "-m", "xenblk", "--config", str(cfg), *args]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)


def test_image_info_on_a_fifo_fails_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.qcow2"
    os.mkfifo(fifo)
    # the old code blocked in open(); the timeout is only a failure bound
    r = _xenblk(tmp_path / "xenblk.toml", "image", "info", str(fifo), "-f", "qcow2", timeout=60)
    assert r.returncode == 1 and "is a FIFO" in r.stderr, r.stderr


def test_image_info_backing_files_follow_the_daemons_rules(make_qcow2: Callable[..., Path], tmp_path: Path) -> None:
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    (base_dir / "real.raw").write_bytes(b"\0" * 65536)
    (base_dir / "link.raw").symlink_to(base_dir / "real.raw")
    ok = make_qcow2("ok.qcow2", "64K", backing=base_dir / "real.raw", backing_fmt="raw")
    via_link = make_qcow2("via-link.qcow2", "64K", backing=base_dir / "link.raw", backing_fmt="raw")
    cfg = tmp_path / "xenblk.toml"
    # no backing dir configured: backing files are refused, with the key to set
    r = _xenblk(cfg, "image", "info", str(ok), "-f", "qcow2")
    assert r.returncode == 1 and "storage.backing_dirs is empty" in r.stderr, r.stderr
    r = _xenblk(cfg, "image", "info", str(ok), "-f", "qcow2", "--backing-dir", str(base_dir))
    assert r.returncode == 0 and "backing file:" in r.stdout, r.stderr
    r = _xenblk(
        tmp_path / "xenblk.toml", "image", "check", str(via_link), "-f", "qcow2", "--backing-dir", str(base_dir)
    )
    assert r.returncode == 1 and "symbolic link" in r.stderr, r.stderr
    r = _xenblk(
        tmp_path / "xenblk.toml", "image", "info", str(ok), "-f", "qcow2", "--backing-dir", str(tmp_path / "elsewhere")
    )
    assert r.returncode == 1 and "outside storage.backing_dirs" in r.stderr, r.stderr


def test_a_fifo_backing_file_is_refused_without_blocking(tmp_path: Path, qemu_tools: None) -> None:
    """A backing chain opened from the Python API: each link regular, beneath a backing dir."""
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    os.mkfifo(base_dir / "pipe.raw")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", str(base_dir / "pipe.raw"), "-F", "raw", str(top), "64K")
    with pytest.raises(StorageError, match="is a FIFO"):
        Image.open(str(top), "qcow2", backing_dirs=[str(base_dir)])
