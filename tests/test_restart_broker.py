"""The sim broker unbinds the ports a client bound when its connection ends, as Xen closes a
dead process's event channels: a restarted backend (kill -9) can bind the guest's port again,
and the guest's end, with a notification sent while nobody was bound, carries on."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from tests.fixtures.wait import GENEROUS
from xenblk.sim.broker import Broker, BrokerClient, BrokerError


async def call(c: BrokerClient, **req: object) -> tuple[dict[str, object], list[int]]:
    return await asyncio.to_thread(c.call, dict(req))


def _notified(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


async def _bind(c: BrokerClient, port: object) -> tuple[dict[str, object], list[int]]:
    return await call(c, op="evtchn_bind_interdomain", domid=0, remote_domid=3, remote_port=port)


async def test_port_is_bindable_again_once_the_binder_is_gone(broker: Broker) -> None:
    with BrokerClient(broker.socket_path) as guest:
        for fd in (await call(guest, op="create_domain", domid=3, mem_pages=4, gnttab_entries=4))[1]:
            os.close(fd)
        r, (g_recv, g_send) = await call(guest, op="evtchn_alloc_unbound", domid=3, remote_domid=0)
        port = r["port"]
        first = BrokerClient(broker.socket_path)
        _, (b_recv, b_send) = await _bind(first, port)
        with BrokerClient(broker.socket_path) as other, pytest.raises(BrokerError, match="already bound"):
            await _bind(other, port)  # the first backend is alive
        first.close()  # the backend process died: its connection ends
        for fd in (b_recv, b_send):
            os.close(fd)
        os.eventfd_write(g_send, 1)  # the guest notifies while nobody is bound
        with BrokerClient(broker.socket_path) as second:
            deadline = time.monotonic() + GENEROUS
            while True:  # the broker notices the closed connection asynchronously
                try:
                    rb, (b2_recv, b2_send) = await _bind(second, port)
                    break
                except BrokerError:
                    if time.monotonic() > deadline:
                        pytest.fail("the port stayed bound after its backend's connection ended")
                    await asyncio.sleep(0.05)
            assert _notified(b2_recv) == 1  # the pending notification is not lost
            os.eventfd_write(b2_send, 1)
            assert _notified(g_recv) == 1
            # Closing it explicitly still works, and the guest's port stays its own.
            await call(second, op="evtchn_close", domid=0, port=rb["port"])
        for fd in (g_recv, g_send, b2_recv, b2_send):
            os.close(fd)
