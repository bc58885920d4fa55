"""The backend's image: `params` = `[format:]path`, `mode`, and the allowed directories.

The format comes from the prefix or, without one, from the file type (block device or
raw file) — never from the contents, which the guest may write (a planted qcow2 header
could point a backing file at any host file).

Where an image may be (docs/config.md, README "Security"):
- a file: under one of `storage.allowed_dirs`, opened beneath that directory without following
  any symlink (a tenant who can write there cannot point its image elsewhere, not even by
  swapping a link in during the open), and a regular file;
- a block device: only when its path matches one of `storage.allowed_devices` (fnmatch
  patterns, e.g. /dev/vg0/guest-*; /dev is no directory of files);
- a qcow2 backing file or the parent of a differencing VHD: only under `storage.backing_dirs`
  (read-only base images; empty by default: no backing files), a regular file, each link of the
  chain checked before it is opened.

`storage.qcow2_dirs` is the admin's rule for toolstacks that can only say raw (libxl's
`backendtype=tap` accepts format=raw|vhd): a regular file under one of those directories
named `aio:`/`raw:`/bare is opened as qcow2 — the rule comes from where the admin put the
file, never from what the file contains.
"""

from __future__ import annotations

import fnmatch
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from xenblk.config import RbdConfig
from xenblk.errors import XenblkError
from xenblk.xen.params import FORMAT_ALIASES, ParamsError, parse_rbd, split_prefix


class ImageSpecError(XenblkError):
    """A refused `params`/`mode` (one line, for B/error)."""


class ImageBusy(ImageSpecError):
    """The image is fine but another open holds its ownership lock (xenblk.storage.lock_image): the
    device waits for it instead of failing (the destination of a handover)."""


@dataclass(frozen=True)
class ImageSpec:
    path: str
    format: str | None  # raw | qcow2 | vhd | block; None: block if S_ISBLK else raw
    readonly: bool

    def resolved_format(self) -> str:
        from xenblk.storage import default_format

        if self.format is not None:
            return self.format
        try:
            st = os.stat(self.path)
        except OSError as e:
            raise ImageSpecError(f"image {self.path}: {e.strerror}") from None
        return default_format(st.st_mode)


def parse_params(params: str | None, mode: str | None) -> ImageSpec:
    if params is None or params == "":
        raise ImageSpecError("backend node params is missing")
    if "\0" in params or "\n" in params:
        raise ImageSpecError("backend node params contains control characters")
    fmt: str | None = None
    prefix, path = split_prefix(params)
    if prefix is not None:
        if prefix not in FORMAT_ALIASES:
            raise ImageSpecError(
                f"unknown image format {prefix!r} in params (known: {', '.join(sorted(FORMAT_ALIASES))})"
            )
        fmt = FORMAT_ALIASES[prefix]
    if fmt == "rbd":
        try:
            name = parse_rbd(path)
        except ParamsError as e:
            raise ImageSpecError(str(e)) from None
        # a snapshot cannot be written: served read-only, as a read-only file is
        return ImageSpec(path=str(name), format="rbd", readonly=parse_mode(mode) or name.snap is not None)
    if not path.startswith("/"):
        raise ImageSpecError(f"image path {path[:80]!r} is not absolute")
    return ImageSpec(path=path, format=fmt, readonly=parse_mode(mode))


def parse_mode(mode: str | None) -> bool:
    """True for read-only. `r`/`ro`: read-only; `w`/`rw`/`w!` (libxl's shared-writable): read-write."""
    if mode in ("r", "ro"):
        return True
    if mode in ("w", "rw", "w!"):
        return False
    raise ImageSpecError(f"backend node mode is {mode!r}: expected r or w")


def apply_format_rules(spec: ImageSpec, qcow2_dirs: list[str]) -> ImageSpec:
    """The admin's storage.qcow2_dirs rule: a raw (or unprefixed) regular file under one of them is qcow2."""
    if spec.format not in (None, "raw") or not qcow2_dirs or not is_allowed(spec.path, qcow2_dirs):
        return spec
    try:
        if not stat.S_ISREG(os.stat(spec.path).st_mode):
            return spec  # a block device keeps its own format; a missing file fails at open with its own error
    except OSError:
        return spec
    return ImageSpec(path=spec.path, format="qcow2", readonly=spec.readonly)


def is_allowed(path: str, allowed_dirs: list[str]) -> bool:
    real = os.path.realpath(path)
    for d in allowed_dirs:
        root = os.path.realpath(d)
        if real == root or real.startswith(root.rstrip("/") + "/"):
            return True
    return False


def check_allowed(path: str, allowed_dirs: list[str], what: str = "image") -> None:
    if not is_allowed(path, allowed_dirs):
        raise ImageSpecError(
            f"{what} {path} is outside storage.allowed_dirs ({', '.join(allowed_dirs) or 'none configured'})"
        )


def device_allowed(path: str, allowed_devices: Sequence[str]) -> bool:
    """The path (as named, normalized: a `..` or `//` never sneaks past a pattern's `*`) matches a pattern."""
    if os.path.normpath(path) != path:
        return False
    return any(fnmatch.fnmatchcase(path, pat) for pat in allowed_devices)


def backing_chain(info: dict[str, Any], image_path: str) -> list[str]:
    """Every backing file of an opened image (from Image.info()), as absolute paths."""
    out: list[str] = []
    base_dir = os.path.dirname(image_path)
    node = info
    while "backing_file" in node:
        b = str(node["backing_file"])
        b_abs = b if b.startswith("/") else os.path.join(base_dir, b)
        out.append(b_abs)
        base_dir = os.path.dirname(b_abs)
        node = node.get("backing", {})
    return out


def _block_only(mode: int) -> str | None:
    from xenblk.storage import file_kind

    return None if stat.S_ISBLK(mode) else f"is {file_kind(mode)}, not a block device"


def open_image(
    spec: ImageSpec,
    allowed_dirs: Sequence[str],
    cache: str,
    *,
    allowed_devices: Sequence[str] = (),
    backing_dirs: Sequence[str] = (),
    meta_writethrough: bool = False,
    rbd: RbdConfig | None = None,
) -> Any:
    """Open the image where the rules above allow it; returns xenblk.storage.Image.
    meta_writethrough: see xenblk.storage.Image.open (set when the rings are journaled).
    Every image, device and backing file is locked as it is opened (lock_image: read-write images
    exclusively, read-only ones and backing files shared); ImageBusy while another open holds it.
    An RBD image (rbd.allowed_pools, [rbd.pools.NAME]) is opened without its exclusive lock: see xenblk.rbd."""
    from xenblk.storage import Image, ImageLocked, StorageError, file_kind, open_checked, open_in_dir, under_dirs

    path = spec.path
    if spec.format == "rbd":
        return _open_rbd(spec, rbd or RbdConfig())
    try:
        if device_allowed(path, allowed_devices):
            # udev's names (/dev/vg/lv, /dev/mapper/...) are links root made: followed
            fd = open_checked(
                lambda fl: os.open(path, fl | os.O_CLOEXEC), path, readonly=spec.readonly, accept=_block_only, lock=True
            )
        else:
            hit = under_dirs(os.path.normpath(path), allowed_dirs)
            if hit is None:
                dirs, devs = (
                    ", ".join(allowed_dirs) or "none configured",
                    ", ".join(allowed_devices) or "none configured",
                )
                raise ImageSpecError(
                    f"image {path} is outside storage.allowed_dirs ({dirs}) and matches no"
                    f" storage.allowed_devices pattern ({devs})"
                )

            def file_only(mode: int) -> str | None:
                if stat.S_ISBLK(mode):
                    return (
                        "is a block device: devices are served only when their path matches storage.allowed_devices"
                        f" ({', '.join(allowed_devices) or 'none configured'})"
                    )
                return None if stat.S_ISREG(mode) else f"is {file_kind(mode)}, not an image file"

            fd = open_in_dir(*hit, f"image {path}", readonly=spec.readonly, accept=file_only, lock=True)
        fmt = spec.format
        if fmt == "block" and not stat.S_ISBLK(os.fstat(fd).st_mode):
            os.close(fd)
            raise ImageSpecError(f"image {path} is not a block device (format block)")
        # Block devices keep the driver's default (O_DIRECT); storage.cache applies to files.
        is_block = fmt == "block" or (fmt is None and stat.S_ISBLK(os.fstat(fd).st_mode))
        return Image.open_fd(
            fd,
            path,
            fmt,
            readonly=spec.readonly,
            cache=None if is_block else cache,
            meta_writethrough=meta_writethrough,
            backing_dirs=backing_dirs,
            lock=True,
        )
    except ImageLocked as e:
        raise ImageBusy(str(e)) from None
    except StorageError as e:
        raise ImageSpecError(str(e)) from None


def _open_rbd(spec: ImageSpec, cfg: RbdConfig) -> Any:
    from xenblk import rbd
    from xenblk.storage import StorageError

    name = parse_rbd(spec.path)
    if cfg.target(name.pool) is None:
        raise ImageSpecError(
            f"rbd image {name}: pool {name.pool} is not in rbd.allowed_pools and has no [rbd.pools.{name.pool}]"
            f" table ({'configured: ' + ', '.join(cfg.names()) if cfg.names() else 'none configured'})"
        )
    try:
        return rbd.open_image(name, cfg, readonly=spec.readonly)
    except StorageError as e:
        raise ImageSpecError(str(e)) from None
