"""What the state machine needs of the data plane, as a protocol, and the adapter onto
`xenblk.xenplatform` + `xenblk.dataplane` (imported lazily: unit tests run the state
machine on a fake that implements `DataplanePort`)."""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from xenblk import log as xlog
from xenblk.backend.frontend import FrontendConfig

if TYPE_CHECKING:
    from xenblk.xenplatform import Platform


@dataclass(frozen=True)
class Advertised:
    """What the backend advertises in InitWait (from [dataplane])."""

    max_ring_page_order: int
    max_queues: int
    max_indirect_segments: int
    persistent: bool
    max_work_per_wake: int
    memory_per_disk: int = 64 << 20  # not advertised: bytes of request buffers the disk's queues may hold


class RunningDevice(Protocol):
    """One connected device: its queues run until stop()."""

    def stop(self) -> None:
        """Blocking: drain, answer, unmap, unbind. Called from an executor thread. Stats stay readable."""

    def close(self, keep_journals: bool = False) -> None:
        """Free the device (after stop); stats are gone. keep_journals: the rings' journals stay for
        the next daemon to resume (a handover at stop), instead of being removed with the device."""

    def stats(self, q: int) -> Any: ...

    def queue_failed(self, q: int) -> str | None: ...

    def fail_fd(self) -> int:
        """Readable once a queue failed (then queue_failed(q) says which); valid until close()."""
        ...

    def set_size(self, nbytes: int) -> None: ...

    def qos_changed(self) -> None:
        """A limiter of the device changed: throttled queues look again now. Never blocks."""


class DataplanePort(Protocol):
    def connect(
        self,
        domid: int,
        devid: int,
        image: Any,
        fe: FrontendConfig,
        adv: Advertised,
        readonly: bool,
        *,
        journal: str | None = None,
        resume: bool = False,
        qos: tuple[Any, Any] = (None, None),
    ) -> RunningDevice:
        """Map the rings, bind the event channels, start every queue; raises XenblkError with a one-line reason.

        journal: a name for this device's ring journals (docs/DESIGN.md, "Restart without guest
        impact"); resume: carry on the rings a killed daemon left from their journals instead of
        starting fresh ones (raises if a journal is missing or does not fit). qos: the disk's and its group's
        xenblk.dataplane.Limiter (either None)."""
        ...

    def close(self) -> None: ...


def journal_paths(journal_dir: str, name: str, queues: int) -> list[Path]:
    return [Path(journal_dir) / f"{name}-q{q}.journal" for q in range(queues)]


def journal_ident(domid: int, devid: int, q: int, fe: FrontendConfig, image: Any) -> str:
    """What a queue's journal belongs to: the frontend's ring and channel as now in XenStore, and
    the image file (a journal is only resumed for exactly these; an RBD image by its name)."""
    dev_ino = (0, 0)
    if image.format != "rbd":
        st = os.stat(image.path)
        dev_ino = (st.st_dev, st.st_ino)
    qk = fe.queues[q]
    desc = (
        f"{domid}/{devid}/{q}/{len(fe.queues)}/{fe.protocol}/{fe.ring_pages}/{list(qk.ring_refs)}/"
        f"{qk.event_channel}/{image.path}/{dev_ino[0]}/{dev_ino[1]}/{image.format}"
    )
    return hashlib.sha256(desc.encode()).hexdigest()[:63]


def journals_on(port: object) -> bool:
    """Whether `port` journals its rings; then a qcow2 image must be opened with meta_writethrough,
    or a kill -9 loses the metadata of acknowledged allocating writes (a fake port does not journal)."""
    return getattr(port, "journal_dir", None) is not None


class NativeDataplane:
    """The C data plane (xenblk.dataplane) on the platform it is given, real Xen or the sim host's;
    it closes the platform when it closes. With `journal_dir`, every queue's ring is journaled
    there, so a restarted daemon can resume it."""

    def __init__(self, platform: Platform, journal_dir: str | None = None) -> None:
        self.platform = platform
        self.journal_dir = journal_dir
        if journal_dir is not None:
            try:
                os.makedirs(journal_dir, mode=0o700, exist_ok=True)
            except OSError as e:
                # Serving matters more than surviving a kill -9: without journals a restart closes the devices.
                xlog.get("xenblk.dataplane").warning("dataplane.no_journals", dir=journal_dir, error=str(e))
                self.journal_dir = None

    def connect(
        self,
        domid: int,
        devid: int,
        image: Any,
        fe: FrontendConfig,
        adv: Advertised,
        readonly: bool,
        *,
        journal: str | None = None,
        resume: bool = False,
        qos: tuple[Any, Any] = (None, None),
    ) -> RunningDevice:
        from xenblk.dataplane import Device, DeviceConfig

        cfg = DeviceConfig(
            domid=domid,
            handle=devid & 0xFFFF,
            abi=fe.protocol,
            ring_pages=fe.ring_pages,
            nr_queues=len(fe.queues),
            readonly=readonly,
            feature_persistent=fe.persistent,
            max_indirect_segments=adv.max_indirect_segments,
            secure_discard=bool(image.can_secure_discard) and not readonly,
            max_work_per_wake=adv.max_work_per_wake,
            memory_budget=adv.memory_per_disk,
        )
        from xenblk.dataplane import DataplaneError

        paths: list[Path] = []
        if journal is not None and self.journal_dir is not None:
            paths = journal_paths(self.journal_dir, journal, len(fe.queues))
        if resume:
            missing = [str(p) for p in paths if not p.is_file()] if paths else ["(journaling is off)"]
            if missing:
                raise DataplaneError(f"no journal to resume from: {', '.join(missing)}")
        self.platform.attach_domain(domid)  # reference-counted by the platform, one per device
        try:
            dev = Device(self.platform, image, cfg)
        except BaseException:
            self.platform.detach_domain(domid)
            raise
        running = _Running(self.platform, domid, dev, paths)
        try:
            if qos[0] is not None or qos[1] is not None:
                dev.set_qos(*qos)
            for q, qk in enumerate(fe.queues):
                if paths:
                    dev.set_journal(q, str(paths[q]), journal_ident(domid, devid, q, fe, image), resume)
                ch = self.platform.bind_evtchn(domid, qk.event_channel)
                try:
                    dev.start_queue(q, list(qk.ring_refs), ch)
                except BaseException:
                    ch.close()  # a started queue owns its channel; this one never started
                    raise
        except BaseException:
            running.stop()
            running.close()
            raise
        return running

    def close(self) -> None:
        self.platform.close()


class _Running:
    def __init__(self, platform: Any, domid: int, dev: Any, journals: list[Path]) -> None:
        self._platform = platform
        self._domid = domid
        self._dev = dev
        self._journals = journals
        self._closed = False

    def stop(self) -> None:
        self._dev.stop()

    def close(self, keep_journals: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._dev.close()
        finally:
            self._platform.detach_domain(self._domid)
            # Drained and answered: nothing left to resume (a stale journal must never match a later ring),
            # unless the next daemon is to carry these rings on.
            for p in [] if keep_journals else self._journals:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    def stats(self, q: int) -> Any:
        return self._dev.stats(q)

    def queue_failed(self, q: int) -> str | None:
        result: str | None = self._dev.queue_failed(q)
        return result

    def fail_fd(self) -> int:
        return int(self._dev.fail_fd())

    def set_size(self, nbytes: int) -> None:
        self._dev.set_size(nbytes)

    def qos_changed(self) -> None:
        self._dev.qos_changed()
