"""Images as Python sees them: a thin layer over the C drivers in xenblk._storage.

The drivers (raw file, block device, qcow2, VHD) live in C so the data plane can use
them without the GIL; this module opens them, turns their negative errnos into
StorageError, and offers synchronous read/write/flush/discard for the control
plane and tests. The format is never guessed from an image's contents: a guest
can write those, so an unlabelled image is raw (or block for a device).

Files are opened here, in Python, and handed to C as fds: each is opened once (first as an
O_PATH probe that cannot block or touch a device, checked with fstat, then for I/O with
O_NONBLOCK, and the fd's inode compared with the probe's), and the fd C uses is the one
checked. A qcow2 backing file (or a differencing VHD's parent) is opened through a callback from
C once C has read its name from the image's header: only under `backing_dirs`, beneath that
directory without following any symlink (openat2 RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS), and only
if it is a regular file.
"""

from __future__ import annotations

import errno as _errno
import fcntl
import os
import stat
import threading
from collections.abc import Callable, Sequence
from typing import Any

from xenblk import _storage  # type: ignore[attr-defined]
from xenblk.errors import XenblkError

ffi: Any = _storage.ffi
lib: Any = _storage.lib

FORMATS = {"raw": lib.XB_FMT_RAW, "block": lib.XB_FMT_BLOCK, "qcow2": lib.XB_FMT_QCOW2, "vhd": lib.XB_FMT_VHD}
# rbd images come from xenblk.rbd (their own module), never from a file: named, not openable here
FORMAT_NAMES = {v: k for k, v in FORMATS.items()} | {lib.XB_FMT_RBD: "rbd"}
CACHE_MODES = ("writeback", "none")
VHD_TYPES = {2: "fixed", 3: "dynamic", 4: "differencing"}


class StorageError(XenblkError):
    """Opening or doing I/O on an image failed; the message names the image and the cause."""

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


class ImageLocked(StorageError):
    """Another open of the image holds a conflicting OFD lock (see lock_image): not a refusal, the
    image is in use; the daemon waits for it to be released."""


_KINDS = {
    stat.S_IFREG: "a regular file",
    stat.S_IFBLK: "a block device",
    stat.S_IFCHR: "a character device",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a directory",
    stat.S_IFLNK: "a symbolic link",
}


def file_kind(mode: int) -> str:
    """What st_mode names, for messages: "a regular file", "a block device", "a FIFO", ..."""
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def default_format(mode: int) -> str:
    """The format of an image named without one: block for a block device, else raw. Never read
    from the contents, which the guest may write (a planted qcow2 header)."""
    return "block" if stat.S_ISBLK(mode) else "raw"


def open_beneath(dirfd: int, rel: str, flags: int, *, walk: bool = False) -> int:
    """os.open of `rel` beneath the directory `dirfd` that never follows a symlink nor leaves the
    directory (see xb_open_beneath); walk=True forces the openat2-less fallback (tests)."""
    fd = int(lib.xb_open_beneath(dirfd, os.fsencode(rel), flags, lib.XB_BENEATH_WALK if walk else 0))
    if fd < 0:
        raise OSError(-fd, os.strerror(-fd), rel)
    return fd


def _os_error(name: str, e: OSError, where: str = "") -> StorageError:
    if e.errno == _errno.ELOOP:
        msg = f"{name}: refused: a symbolic link in its path (links are not followed{where})"
    elif e.errno == _errno.EXDEV:
        msg = f"{name}: refused: the path leaves its directory{where}"
    else:
        msg = f"{name}: {e.strerror}"
    return StorageError(msg, e.errno or 0)


def lock_image(fd: int, name: str) -> None:
    """Takes the image's ownership lock on `fd`: an OFD lock on the whole file (block device: its
    /dev node), a write lock if fd is open read-write, else a read lock, so read-only users share and
    a writer excludes everyone. It belongs to this open file description, which is handed to C and
    closed last by xb_image_close (after the driver's own final writes) or by the kernel when the
    process dies: the lock is released exactly when this open ends, never earlier. Raises
    ImageLocked when another open holds a conflicting lock, StorageError if the file cannot be
    locked at all (the image is then not served: unprotected is not an option)."""
    rc = int(lib.xb_ofd_lock(fd))
    if rc == 0:
        return
    if rc > 0:
        mine = "read-write" if _writable(fd) else "read-only"
        held = "read-write" if rc == lib.XB_LOCK_HELD_WRITE else "read-only"
        raise ImageLocked(
            f"{name}: in use: another open of this image holds it {held} (OFD lock; another xenblk daemon, or "
            f"another device of this one), so it cannot be opened {mine} until that is released",
            _errno.EAGAIN,
        )
    raise StorageError(f"{name}: cannot take its ownership lock (OFD lock): {os.strerror(-rc)}", -rc)


def _writable(fd: int) -> bool:
    return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY


def open_checked(
    opener: Callable[[int], int],
    name: str,
    *,
    readonly: bool,
    accept: Callable[[int], str | None],
    where: str = "",
    lock: bool = False,
) -> int:
    """Opens a file through `opener(os flags) -> fd` the way every image is opened: an O_PATH
    probe first (no side effect: a FIFO cannot block, a device is not opened), `accept(st_mode)`
    (None, or why not), then the real open with O_NONBLOCK (the driver clears it), read-write
    falling back to read-only where the file refuses writing, and the same inode or nothing.
    lock: then lock_image() before anything reads the file (raises ImageLocked).
    Returns the fd; raises StorageError."""
    try:
        probe = opener(os.O_PATH)
    except OSError as e:
        raise _os_error(name, e, where) from None
    try:
        st = os.fstat(probe)
    finally:
        os.close(probe)
    why = accept(st.st_mode)
    if why:
        raise StorageError(f"{name}: {why}", _errno.EPERM)
    base = os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        try:
            fd = opener(base | (os.O_RDONLY if readonly else os.O_RDWR))
        except OSError as e:
            if readonly or e.errno not in (_errno.EACCES, _errno.EROFS, _errno.EPERM):
                raise
            fd = opener(base | os.O_RDONLY)  # a read-only file or device is served read-only
    except OSError as e:
        raise _os_error(name, e, where) from None
    st2 = os.fstat(fd)
    if (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino) or stat.S_IFMT(st2.st_mode) != stat.S_IFMT(st.st_mode):
        os.close(fd)
        raise StorageError(f"{name}: refused: it was replaced while being opened", _errno.EAGAIN)
    if lock:
        try:
            lock_image(fd, name)
        except BaseException:
            os.close(fd)
            raise
    return fd


def under_dirs(path: str, dirs: Sequence[str]) -> tuple[str, str] | None:
    """(directory, path relative to it) for the first of `dirs` that holds the normalized absolute
    `path` (lexically: the open beneath that directory is what enforces it), else None."""
    for d in dirs:
        for root in dict.fromkeys((os.path.normpath(d), os.path.realpath(d))):
            r = root.rstrip("/")
            if path.startswith(r + "/") and len(path) > len(r) + 1:
                return root, path[len(r) + 1 :]
    return None


def open_in_dir(
    root: str, rel: str, name: str, *, readonly: bool, accept: Callable[[int], str | None], lock: bool = False
) -> int:
    """open_checked of root/rel, beneath root (the admin's directory, whose own path may hold links)."""
    try:
        dirfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise StorageError(f"{name}: directory {root}: {e.strerror}", e.errno or 0) from None
    try:
        return open_checked(
            lambda fl: open_beneath(dirfd, rel, fl),
            name,
            readonly=readonly,
            accept=accept,
            where=f" under {root}",
            lock=lock,
        )
    finally:
        os.close(dirfd)


def regular_only(mode: int) -> str | None:
    return None if stat.S_ISREG(mode) else f"is {file_kind(mode)} (only regular files are accepted here)"


def open_backing_file(parent: str, name: str, backing_dirs: Sequence[str], *, lock: bool = False) -> tuple[int, str]:
    """The backing file `name` of the image `parent` (the name comes from the parent's header:
    hostile): resolved against the parent's directory when relative, normalized, accepted only
    under one of `backing_dirs`, opened read-only beneath it, a regular file; lock: with a read
    lock (lock_image), so base images are shared and never opened read-write meanwhile.
    Returns (fd, path)."""
    if not backing_dirs:
        raise StorageError(
            f"{parent}: backing file {name!r} refused: backing files are not allowed (storage.backing_dirs is empty)",
            _errno.EPERM,
        )
    p = os.path.normpath(name if name.startswith("/") else os.path.join(os.path.dirname(parent), name))
    hit = under_dirs(p, backing_dirs)
    if hit is None:
        shown = p if name == p else f"{name!r} ({p})"
        raise StorageError(
            f"{parent}: backing file {shown} is outside storage.backing_dirs ({', '.join(backing_dirs)})",
            _errno.EPERM,
        )
    fd = open_in_dir(*hit, f"{parent}: backing file {p}", readonly=True, accept=regular_only, lock=lock)
    return fd, p


class _BackingOpener:
    """What the xb_backing_fn C calls for each backing file of a chain does (see open_backing_file); C calls
    lib.xb_py_open_backing with a handle to this object as ctx."""

    def __init__(self, backing_dirs: Sequence[str], lock: bool) -> None:
        self.dirs = list(backing_dirs)
        self.lock = lock
        self.error: StorageError | None = None  # the refusal, whole (C's copy is cut at XB_ERRLEN)

    def _call(self, ctx: Any, parent_c: Any, name_c: Any, fmt_c: Any, resolved_c: Any, err_c: Any) -> int:
        parent = os.fsdecode(ffi.string(parent_c))
        try:
            fd, path = open_backing_file(parent, os.fsdecode(ffi.string(name_c)), self.dirs, lock=self.lock)
        except StorageError as e:
            self.error = e
            _set_err(err_c, str(e))
            return -(e.errno or _errno.EPERM)
        except BaseException as e:  # nothing may unwind into C
            _set_err(err_c, f"{parent}: backing file: internal error: {e!r}")
            return -_errno.EIO
        b = os.fsencode(path)[: lib.XB_PATHLEN - 1]
        ffi.memmove(resolved_c, b + b"\0", len(b) + 1)
        return fd


@ffi.def_extern()  # type: ignore[untyped-decorator]
def xb_py_open_backing(ctx: Any, parent_c: Any, name_c: Any, fmt_c: Any, resolved_c: Any, err_c: Any) -> int:
    # extern "Python", not ffi.callback: no W+X memory (xenblk.service has MemoryDenyWriteExecute=yes)
    try:
        opener: _BackingOpener = ffi.from_handle(ctx)
    except BaseException:  # nothing may unwind into C
        return -_errno.EIO
    return opener._call(ctx, parent_c, name_c, fmt_c, resolved_c, err_c)


def _set_err(err_c: Any, msg: str) -> None:
    b = msg.encode(errors="replace")[: lib.XB_ERRLEN - 1]
    ffi.memmove(err_c, b + b"\0", len(b) + 1)


def _check(rc: int, what: str, path: str) -> int:
    if rc < 0:
        raise StorageError(f"{path}: {what} failed: {os.strerror(-rc)}", -rc)
    return rc


class Image:
    """One open image. Thread-safe like the driver under it; close() is idempotent."""

    def __init__(self, ptr: Any, path: str) -> None:
        self.ptr = ptr
        self.path = path
        self._lock = threading.Lock()

    @classmethod
    def open(
        cls,
        path: str,
        fmt: str | None = None,
        *,
        readonly: bool = False,
        cache: str | None = None,
        meta_writethrough: bool = False,
        backing_dirs: Sequence[str] = (),
        lock: bool = False,
    ) -> Image:
        """Opens `path` as named by a trusted caller (tests, `xenblk image`; the daemon goes through
        xenblk.backend.imagespec.open_image, which adds its directory rules): a regular file or a
        block device, never blocking on a FIFO; qcow2 backing files only under `backing_dirs`.
        cache None: the format's default (page cache for files, O_DIRECT for block devices);
        "none": O_DIRECT; "writeback": page cache, even for a block device. meta_writethrough
        (qcow2, VHD): a write that allocates puts its metadata in the file before it returns, so a
        killed process loses no acknowledged write (docs/DESIGN.md, "Restart without guest impact").
        lock: take the ownership lock (lock_image) on the image and its backing files, as the daemon
        does; ImageLocked if another open holds it."""
        name = os.path.abspath(path)

        def file_or_device(mode: int) -> str | None:
            if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
                return None
            return f"is {file_kind(mode)}, not an image file or block device"

        fd = open_checked(
            lambda fl: os.open(path, fl | os.O_CLOEXEC), name, readonly=readonly, accept=file_or_device, lock=lock
        )
        return cls.open_fd(
            fd,
            name,
            fmt,
            readonly=readonly,
            cache=cache,
            meta_writethrough=meta_writethrough,
            backing_dirs=backing_dirs,
            lock=lock,  # for the backing files: open_checked locked fd
        )

    @classmethod
    def open_fd(
        cls,
        fd: int,
        name: str,
        fmt: str | None = None,
        *,
        readonly: bool = False,
        cache: str | None = None,
        meta_writethrough: bool = False,
        backing_dirs: Sequence[str] = (),
        lock: bool = False,
    ) -> Image:
        """The driver on an fd the caller opened and checked (ownership passes: it is closed on
        failure too). fmt None: block for a block device, else raw. lock: the backing files are
        opened with their read lock (the caller has locked fd itself, before anything read it)."""
        try:
            if fmt is None:
                fmt = default_format(os.fstat(fd).st_mode)
            if fmt not in FORMATS:
                raise StorageError(f"{name}: unknown image format {fmt!r} (expected one of {', '.join(FORMATS)})")
            if cache is not None and cache not in CACHE_MODES:
                raise StorageError(f"{name}: unknown cache mode {cache!r} (expected one of {', '.join(CACHE_MODES)})")
        except BaseException:
            os.close(fd)
            raise
        flags = 0
        if readonly:
            flags |= lib.XB_OPEN_RDONLY
        if cache == "none":
            flags |= lib.XB_OPEN_DIRECT
        elif cache == "writeback" and fmt == "block":
            flags |= lib.XB_OPEN_BUFFERED
        if meta_writethrough:
            flags |= lib.XB_OPEN_WRITETHROUGH_META
        err = ffi.new("char[]", lib.XB_ERRLEN)
        opener = _BackingOpener(backing_dirs, lock)
        handle = ffi.new_handle(opener)  # alive for the whole call: C calls back only during it
        ptr = lib.xb_image_open_fd(fd, os.fsencode(name), FORMATS[fmt], flags, lib.xb_py_open_backing, handle, err)
        if ptr == ffi.NULL:
            if opener.error is not None:  # the chain stops at the first refusal: that is the cause
                raise opener.error
            raise StorageError(ffi.string(err).decode(errors="replace") or f"{name}: cannot open")
        return cls(ptr, name)

    def _p(self) -> Any:
        if self.ptr is None:
            raise StorageError(f"{self.path}: image is closed")
        return self.ptr

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def size(self) -> int:
        return int(self._p().size)

    @property
    def logical_block(self) -> int:
        return int(self._p().logical_block)

    @property
    def physical_block(self) -> int:
        return int(self._p().physical_block)

    @property
    def discard_granularity(self) -> int:
        return int(self._p().discard_granularity)

    @property
    def discard_alignment(self) -> int:
        return int(self._p().discard_alignment)

    @property
    def caps(self) -> int:
        return int(self._p().caps)

    @property
    def readonly(self) -> bool:
        return bool(self.caps & lib.XB_CAP_READONLY)

    @property
    def can_flush(self) -> bool:
        return bool(self.caps & lib.XB_CAP_FLUSH)

    @property
    def can_discard(self) -> bool:
        return bool(self.caps & lib.XB_CAP_DISCARD)

    @property
    def can_secure_discard(self) -> bool:
        return bool(self.caps & lib.XB_CAP_SECURE_DISCARD)

    @property
    def direct(self) -> bool:
        return bool(self._p().direct)

    @property
    def format(self) -> str:
        return FORMAT_NAMES[int(self._p().format)]

    def read(self, off: int, n: int) -> bytes:
        buf = ffi.new("char[]", max(n, 1))
        _check(lib.xb_image_read(self._p(), buf, n, off), f"read of {n} bytes at {off}", self.path)
        return bytes(ffi.buffer(buf, n))

    def write(self, off: int, data: bytes) -> None:
        _check(lib.xb_image_write(self._p(), data, len(data), off), f"write of {len(data)} bytes at {off}", self.path)

    def flush(self) -> None:
        _check(lib.xb_image_flush(self._p()), "flush", self.path)

    def discard(self, off: int, n: int, secure: bool = False) -> None:
        _check(lib.xb_image_discard(self._p(), off, n, int(secure)), f"discard of {n} bytes at {off}", self.path)

    def write_zeroes(self, off: int, n: int) -> None:
        _check(lib.xb_image_write_zeroes(self._p(), off, n), f"write-zeroes of {n} bytes at {off}", self.path)

    def refresh_size(self) -> int:
        return _check(lib.xb_image_refresh_size(self._p()), "size refresh", self.path)

    def close(self) -> None:
        with self._lock:
            if self.ptr is not None:
                lib.xb_image_close(self.ptr)
                self.ptr = None

    def info(self) -> dict[str, Any]:
        """Format, sizes, allocation and the backing chain (each backing image's info nested)."""
        return _describe(self._p(), self.path)

    def check(self) -> dict[str, Any]:
        """The driver's consistency check: qcow2 counts leaked and corrupt clusters, VHD overlapping or
        out-of-bounds blocks and a footer missing from the end (blocks count as clusters); raw is always clean."""
        res = ffi.new("struct xb_check_result *")
        err = ffi.new("char[]", lib.XB_ERRLEN)
        rc = lib.xb_image_check(self._p(), res, err)
        if rc < 0:
            msg = ffi.string(err).decode(errors="replace") or os.strerror(-rc)
            raise StorageError(f"{self.path}: check failed: {msg}", -rc)
        return {
            "format": self.format,
            "corruptions": int(res.corruptions),
            "leaks": int(res.leaks),
            "allocated_clusters": int(res.allocated_clusters),
            "total_clusters": int(res.total_clusters),
            "fragmented_clusters": int(res.fragmented_clusters),
            "ok": res.corruptions == 0,
        }

    def repair_leaks(self) -> int:
        """Gives back clusters a killed writer left counted but unused (qcow2); returns how many. Only
        before the image is served (nothing in flight); an image with corruptions is refused."""
        res = ffi.new("struct xb_check_result *")
        err = ffi.new("char[]", lib.XB_ERRLEN)
        rc = lib.xb_image_repair_leaks(self._p(), res, err)
        if rc < 0:
            msg = ffi.string(err).decode(errors="replace") or os.strerror(-rc)
            raise StorageError(f"{self.path}: leak repair failed: {msg}", -rc)
        return int(res.leaks)


def _describe(ptr: Any, path: str) -> dict[str, Any]:
    d = ffi.new("struct xb_image_desc *")
    _check(lib.xb_image_describe(ptr, d), "describe", path)
    out: dict[str, Any] = {
        "filename": path,
        "format": FORMAT_NAMES.get(int(d.format), str(d.format)),
        "virtual_size": int(d.virtual_size),
        "allocated_bytes": int(d.allocated_bytes),
    }
    if d.format == lib.XB_FMT_QCOW2:
        out["cluster_size"] = int(d.cluster_size)
        out["qcow2_version"] = int(d.qcow2_version)
        out["refcount_bits"] = int(d.refcount_bits)
        out["compression_type"] = "zstd" if d.compression_type == 1 else "zlib"
        backing = ffi.string(d.backing_file).decode(errors="replace")
        if backing:
            out["backing_file"] = backing
            out["backing_format"] = ffi.string(d.backing_format).decode(errors="replace") or "raw"
            b = lib.xb_image_backing(ptr)
            if b != ffi.NULL:
                out["backing"] = _describe(b, backing)
    elif d.format == lib.XB_FMT_VHD:
        out["vhd_type"] = VHD_TYPES.get(int(d.vhd_disk_type), str(d.vhd_disk_type))
        if d.cluster_size:
            out["block_size"] = int(d.cluster_size)
        parent = ffi.string(d.backing_file).decode(errors="replace")
        if parent:
            out["backing_file"] = parent
            out["backing_format"] = "vhd"
            b = lib.xb_image_backing(ptr)
            if b != ffi.NULL:
                out["backing"] = _describe(b, parent)
    return out
