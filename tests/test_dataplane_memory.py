"""The per-disk memory budget (issue 14 item 3): a guest filling its ring with 1 MiB indirect writes
to unallocated qcow2 clusters (every one of them goes the slow path and waits there) makes the queue
hold at most its share of the budget in data buffers. When the budget is spent the queue stops
taking requests from the ring and resumes as answered requests give their buffers back: every
request is answered, its data is on the image, and the peak of the buffers never passed the budget."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fixtures.faults import MakeGuestDisk
from tests.fixtures.ring import OP_WRITE, RSP_OKAY, pattern_bytes

MiB = 1 << 20
SECTORS_PER_MIB = MiB // 512


def _flood(make: MakeGuestDisk, path: Path, nr_queues: int, budget: int, writes: int) -> list[tuple[int, int, int]]:
    """`writes` 1 MiB indirect writes per queue, all on the ring at once (one push), over the same
    granted pages; returns (mem_peak, mem_waits, mem_bytes) per queue once everything is answered."""
    d, img = make(path, "qcow2", nr_queues=nr_queues, memory_budget=budget, max_indirect_segments=256)
    data = pattern_bytes(0, MiB, seed=7)
    frames, refs = d.data_pages(data, readonly=True)
    batches = []
    for q in range(nr_queues):
        raws, extras = [], []
        for k in range(writes):
            _, raw, extra = d.rw_raw(OP_WRITE, (q * writes + k) * SECTORS_PER_MIB, refs, MiB, indirect=True)
            raws.append(raw)
            extras.append(extra)
        batches.append((raws, extras))
    for q, (raws, extras) in enumerate(batches):
        out = d.submit(raws, q=q, timeout=60)
        assert len(out) == writes and all(r.status == RSP_OKAY for r in out.values()), out
        for e in extras:
            d.release(*e)
    d.release(frames, refs)
    for k in range(nr_queues * writes):
        assert img.read(k * MiB, MiB) == data, f"MiB {k} of the image"
    return [(s.mem_peak, s.mem_waits, s.mem_bytes) for s in (d.stats(q) for q in range(nr_queues))]


def test_budget_bounds_a_1mib_indirect_flood(guest_disks: MakeGuestDisk, make_qcow2: Callable[..., Path]) -> None:
    budget = 4 * MiB
    ((peak, waits, held),) = _flood(guest_disks, make_qcow2("fresh.qcow2", "64M"), 1, budget, 32)
    assert peak <= budget, f"the queue held {peak / MiB:.1f} MiB of buffers, budget {budget / MiB:.0f} MiB"
    assert waits > 0, "32 MiB of requests against a 4 MiB budget: the ring must have waited"
    assert held <= 128 * 1024 * 32, "afterwards only reusable small buffers may be kept"


def test_budget_is_split_between_queues(guest_disks: MakeGuestDisk, make_qcow2: Callable[..., Path]) -> None:
    budget = 4 * MiB
    stats = _flood(guest_disks, make_qcow2("fresh.qcow2", "64M"), 2, budget, 12)
    assert sum(peak for peak, _, _ in stats) <= budget, stats
    assert all(waits > 0 for _, waits, _ in stats), stats


@pytest.mark.parametrize("budget", [1, 512 * 1024])
def test_budget_below_one_request_still_progresses(
    guest_disks: MakeGuestDisk, make_qcow2: Callable[..., Path], budget: int
) -> None:
    """One largest request per queue is always allowed (else it could never run): no deadlock."""
    ((peak, waits, _),) = _flood(guest_disks, make_qcow2("fresh.qcow2", "64M"), 1, budget, 8)
    assert peak <= MiB and waits > 0
