"""Images as Python sees them: a thin layer over the C drivers in xenblk._storage.

The drivers (raw file, block device, qcow2) live in C so the data plane can use
them without the GIL; this module opens them, turns their negative errnos into
StorageError, and offers synchronous read/write/flush/discard for the control
plane and tests. The format is never guessed from an image's contents: a guest
can write those, so an unlabelled image is raw (or block for a device).
"""

from __future__ import annotations

import os
import stat
import threading
from typing import Any

from xenblk import _storage  # type: ignore[attr-defined]
from xenblk.errors import XenblkError

ffi: Any = _storage.ffi
lib: Any = _storage.lib

FORMATS = {"raw": lib.XB_FMT_RAW, "block": lib.XB_FMT_BLOCK, "qcow2": lib.XB_FMT_QCOW2}
FORMAT_NAMES = {v: k for k, v in FORMATS.items()}
CACHE_MODES = ("writeback", "none")


class StorageError(XenblkError):
    """Opening or doing I/O on an image failed; the message names the image and the cause."""

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


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
    ) -> Image:
        """cache None: the format's default (page cache for files, O_DIRECT for block devices);
        "none": O_DIRECT; "writeback": page cache, even for a block device. meta_writethrough
        (qcow2): a write that allocates puts its metadata in the file before it returns, so a
        killed process loses no acknowledged write (docs/DESIGN.md, "Restart without guest impact")."""
        if fmt is None:
            try:
                st = os.stat(path)
            except OSError as e:
                raise StorageError(f"{path}: {e.strerror}", e.errno or 0) from None
            fmt = "block" if stat.S_ISBLK(st.st_mode) else "raw"
        if fmt not in FORMATS:
            raise StorageError(f"{path}: unknown image format {fmt!r} (expected one of {', '.join(FORMATS)})")
        if cache is not None and cache not in CACHE_MODES:
            raise StorageError(f"{path}: unknown cache mode {cache!r} (expected one of {', '.join(CACHE_MODES)})")
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
        ptr = lib.xb_image_open(os.fsencode(path), FORMATS[fmt], flags, err)
        if ptr == ffi.NULL:
            raise StorageError(ffi.string(err).decode(errors="replace") or f"{path}: cannot open")
        return cls(ptr, path)

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
        """The driver's consistency check: qcow2 counts leaked and corrupt clusters; raw is always clean."""
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
    return out


FAULT_OPS = {
    "read": lib.XB_FAULT_READ,
    "write": lib.XB_FAULT_WRITE,
    "flush": lib.XB_FAULT_FLUSH,
    "discard": lib.XB_FAULT_DISCARD,
}


class FaultImage(Image):
    """TEST ONLY: an image whose ops fail on demand (native/storage/fault.c), for storage-fault tests.

    Wraps a real image and forwards to it; inject_fault() makes matching calls fail with an errno
    instead. The daemon never creates one (no config key, XenStore node or guest request leads
    here). Faults also hold on the data plane's fast path: the wrapper refuses to map() a range a
    live read/write fault covers, so that I/O takes the slow path and fails."""

    def __init__(self, ptr: Any, path: str, inner: Any) -> None:
        super().__init__(ptr, path)
        self._inner = inner

    @classmethod
    def wrap(cls, image: Image) -> FaultImage:
        """Takes ownership of `image` (it reads as closed afterwards; closing the wrapper closes it)."""
        with image._lock:
            inner = image._p()
            ptr = lib.xb_fault_wrap(inner)
            if ptr == ffi.NULL:
                raise StorageError(f"{image.path}: cannot wrap for fault injection", 12)
            image.ptr = None
        return cls(ptr, image.path, inner)

    @classmethod
    def open(
        cls,
        path: str,
        fmt: str | None = None,
        *,
        readonly: bool = False,
        cache: str | None = None,
        meta_writethrough: bool = False,
    ) -> Image:
        return cls.wrap(Image.open(path, fmt, readonly=readonly, cache=cache, meta_writethrough=meta_writethrough))

    def inject_fault(
        self, ops: str | tuple[str, ...], errno: int, *, off: int = 0, length: int = 0, after: int = 0, count: int = 0
    ) -> int:
        """Fail `ops` ("read", "write", "flush", "discard"; write covers write-zeroes) touching
        [off, off+length) (length 0: to the end) with -errno: the first `after` matching calls pass,
        the next `count` fail (0: every one). Returns the rule's number for fault_hits()."""
        names = (ops,) if isinstance(ops, str) else ops
        mask = 0
        for name in names:
            if name not in FAULT_OPS:
                raise StorageError(f"unknown fault op {name!r} (expected one of {', '.join(FAULT_OPS)})")
            mask |= FAULT_OPS[name]
        return _check(lib.xb_fault_add(self._p(), mask, errno, off, length, after, count), "fault rule", self.path)

    def fault_hits(self, rule: int) -> int:
        """How many calls rule `rule` has failed so far."""
        return _check(lib.xb_fault_hits(self._p(), rule), "fault hits", self.path)

    def clear_faults(self) -> None:
        _check(lib.xb_fault_clear(self._p()), "fault clear", self.path)

    def check(self) -> dict[str, Any]:
        with self._lock:
            self._p()
            return Image(self._inner, self.path).check()

    def info(self) -> dict[str, Any]:
        return _describe(self._inner if self.ptr is not None else self._p(), self.path)
