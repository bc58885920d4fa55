"""What the state machine needs of the data plane, as a protocol, and the adapter onto
`xenblk.platform` + `xenblk.dataplane` (imported lazily: unit tests run the state
machine on a fake that implements `DataplanePort`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from xenblk.backend.frontend import FrontendConfig


@dataclass(frozen=True)
class Advertised:
    """What the backend advertises in InitWait (from [dataplane])."""

    max_ring_page_order: int
    max_queues: int
    max_indirect_segments: int
    persistent: bool
    max_work_per_wake: int


class RunningDevice(Protocol):
    """One connected device: its queues run until stop()."""

    def stop(self) -> None:
        """Blocking: drain, answer, unmap, unbind. Called from an executor thread. Stats stay readable."""

    def close(self) -> None:
        """Free the device (after stop); stats are gone."""

    def stats(self, q: int) -> Any: ...

    def queue_failed(self, q: int) -> str | None: ...

    def set_size(self, nbytes: int) -> None: ...


class DataplanePort(Protocol):
    def connect(
        self, domid: int, devid: int, image: Any, fe: FrontendConfig, adv: Advertised, readonly: bool
    ) -> RunningDevice:
        """Map the rings, bind the event channels, start every queue; raises XenblkError with a one-line reason."""
        ...

    def close(self) -> None: ...


class RealDataplane:
    """The product's data plane on the real or simulated platform."""

    def __init__(self, sim_dir: str | None, self_domid: int) -> None:
        from xenblk.platform import open_platform

        self.platform = open_platform(sim_dir, self_domid)

    def connect(
        self, domid: int, devid: int, image: Any, fe: FrontendConfig, adv: Advertised, readonly: bool
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
        )
        self.platform.attach_domain(domid)  # reference-counted by the platform, one per device
        try:
            dev = Device(self.platform, image, cfg)
        except BaseException:
            self.platform.detach_domain(domid)
            raise
        running = _Running(self.platform, domid, dev)
        try:
            for q, qk in enumerate(fe.queues):
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
    def __init__(self, platform: Any, domid: int, dev: Any) -> None:
        self._platform = platform
        self._domid = domid
        self._dev = dev
        self._closed = False

    def stop(self) -> None:
        self._dev.stop()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._dev.close()
        finally:
            self._platform.detach_domain(self._domid)

    def stats(self, q: int) -> Any:
        return self._dev.stats(q)

    def queue_failed(self, q: int) -> str | None:
        result: str | None = self._dev.queue_failed(q)
        return result

    def set_size(self, nbytes: int) -> None:
        self._dev.set_size(nbytes)
