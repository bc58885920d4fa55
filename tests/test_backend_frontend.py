"""The frontend-key parser (pure function over what a guest wrote) and the image spec parser:
exact outcomes for the documented cases, plus a seeded random sweep of hostile key maps that
must only ever produce a config within the advertised bounds or a FrontendError."""

from __future__ import annotations

import random

import pytest

from xenblk.backend.frontend import FrontendError, Limits, parse_frontend, parse_head, queue_key_names
from xenblk.backend.imagespec import ImageSpecError, backing_chain, is_allowed, parse_mode, parse_params
from xenblk.backend.ratelimit import RateLimitedLog
from xenblk.xen.states import parse_state

LIMITS = Limits(max_ring_page_order=4, max_queues=4, persistent=True)


def test_single_ring_defaults() -> None:
    fe = parse_frontend({"ring-ref": "8", "event-channel": "5"}, LIMITS)
    assert (fe.protocol, fe.ring_page_order, fe.persistent) == ("x86_64-abi", 0, False)
    assert [(q.ring_refs, q.event_channel) for q in fe.queues] == [((8,), 5)]


def test_multi_queue_multi_page() -> None:
    keys = {"protocol": "x86_32-abi", "ring-page-order": "1", "multi-queue-num-queues": "2", "feature-persistent": "1"}
    for q in range(2):
        keys |= {f"queue-{q}/ring-ref0": str(10 * q + 1), f"queue-{q}/ring-ref1": str(10 * q + 2)}
        keys[f"queue-{q}/event-channel"] = str(q + 7)
    fe = parse_frontend(keys, LIMITS)
    assert fe.protocol == "x86_32-abi" and fe.ring_pages == 2 and fe.persistent
    assert [(q.ring_refs, q.event_channel) for q in fe.queues] == [((1, 2), 7), ((11, 12), 8)]


def test_ring_ref0_accepted_for_a_one_page_ring() -> None:
    assert parse_frontend({"ring-ref0": "3", "event-channel": "1"}, LIMITS).queues[0].ring_refs == (3,)


def test_persistence_needs_both_sides() -> None:
    keys = {"ring-ref": "1", "event-channel": "1", "feature-persistent": "1"}
    assert not parse_frontend(keys, Limits(4, 4, persistent=False)).persistent


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"ring-page-order": "5"}, "ring-page-order=5 is out of range 0..4"),
        ({"multi-queue-num-queues": "5"}, "multi-queue-num-queues=5 is out of range 1..4"),
        ({"protocol": "x86_64-abi\n"}, "is not supported"),
        ({"ring-ref": " 1"}, "ring-ref is not a number"),
        ({"ring-ref": "+1"}, "ring-ref is not a number"),
        ({"ring-ref": "4294967296"}, "ring-ref=4294967296 is out of range"),
        ({"event-channel": "2147483648"}, "event-channel=2147483648 is out of range"),
        ({"ring-ref": None}, "ring-ref is missing"),
        ({"event-channel": None}, "event-channel is missing"),
        ({"ring-page-order": "1", "ring-ref0": "1", "ring-ref1": "1"}, "repeat a grant"),
    ],
)
def test_refusals(keys: dict[str, str | None], message: str) -> None:
    base: dict[str, str | None] = {"ring-ref": "1", "event-channel": "3"}
    with pytest.raises(FrontendError, match=message.replace("+", r"\+")):
        parse_frontend({**base, **keys}, LIMITS)


def test_queues_may_not_share_an_event_channel() -> None:
    keys = {"multi-queue-num-queues": "2", "queue-0/ring-ref": "1", "queue-1/ring-ref": "2"}
    keys |= {"queue-0/event-channel": "4", "queue-1/event-channel": "4"}
    with pytest.raises(FrontendError, match="share an event channel"):
        parse_frontend(keys, LIMITS)


def test_queue_key_names_are_read_only_within_bounds() -> None:
    head = parse_head({"multi-queue-num-queues": "4", "ring-page-order": "4"}, LIMITS)
    assert len(queue_key_names(head)) == 4 * (16 + 1)
    with pytest.raises(FrontendError):
        parse_head({"multi-queue-num-queues": "1000"}, LIMITS)


def test_random_hostile_key_maps() -> None:
    rng = random.Random(1234)
    names = ["protocol", "ring-page-order", "multi-queue-num-queues", "feature-persistent", "ring-ref", "ring-ref0",
             "ring-ref1", "event-channel", "queue-0/ring-ref", "queue-0/event-channel", "queue-1/ring-ref",
             "queue-1/event-channel", "queue-1/ring-ref0", "queue-0/ring-ref0"]  # fmt: skip
    values = ["0", "1", "2", "4", "16", "-1", "", "x86_64-abi", "native", "x86_32-abi", "1e3", "0x10", "٣", "9" * 30,
              "4294967295", "2147483647", " 3", "3\0", "é"]  # fmt: skip
    accepted = 0
    for _ in range(20000):
        keys = {rng.choice(names): rng.choice(values) for _ in range(rng.randint(0, 9))}
        try:
            fe = parse_frontend(keys, LIMITS)
        except FrontendError:
            continue
        accepted += 1
        assert 0 <= fe.ring_page_order <= LIMITS.max_ring_page_order
        assert 1 <= len(fe.queues) <= LIMITS.max_queues
        for q in fe.queues:
            assert len(q.ring_refs) == fe.ring_pages and all(0 <= r < 1 << 32 for r in q.ring_refs)
            assert 1 <= q.event_channel < 1 << 31
    assert accepted > 0


@pytest.mark.parametrize(
    ("params", "mode", "expect"),
    [
        ("/img/a.raw", "w", ("/img/a.raw", None, False)),
        ("aio:/img/a.raw", "r", ("/img/a.raw", "raw", True)),
        ("qcow2:/img/a:b.qcow2", "w!", ("/img/a:b.qcow2", "qcow2", False)),
        ("phy:/dev/vg/lv", "w", ("/dev/vg/lv", "block", False)),
        ("vhd:/img/a.vhd", "w", ("/img/a.vhd", "vhd", False)),
        ("/img/with:colon", "ro", ("/img/with:colon", None, True)),
    ],
)
def test_params(params: str, mode: str, expect: tuple[str, str | None, bool]) -> None:
    spec = parse_params(params, mode)
    assert (spec.path, spec.format, spec.readonly) == expect


@pytest.mark.parametrize(
    ("params", "mode", "message"),
    [
        (None, "w", "params is missing"),
        ("qcow2:a.qcow2", "w", "is not absolute"),
        ("/a\n/b", "w", "control characters"),
        ("/a", None, "mode is None"),
        ("/a", "rw-", "expected r or w"),
    ],
)
def test_params_refused(params: str | None, mode: str | None, message: str) -> None:
    with pytest.raises(ImageSpecError, match=message):
        parse_params(params, mode)
    assert parse_mode("r") and not parse_mode("w")


def test_allowed_dirs_use_realpath() -> None:
    assert is_allowed("/var/lib/xen/images/a.raw", ["/var/lib/xen/images"])
    assert not is_allowed("/var/lib/xen/images/../../../etc/shadow", ["/var/lib/xen/images"])
    assert not is_allowed("/var/lib/xen/images2/a", ["/var/lib/xen/images"])
    assert is_allowed("/dev/loop0", ["/dev"])


def test_backing_chain_relative_names() -> None:
    info = {"backing_file": "base.qcow2", "backing": {"backing_file": "../raw/base.raw", "backing": {}}}
    assert backing_chain(info, "/img/top.qcow2") == ["/img/base.qcow2", "/img/../raw/base.raw"]


def test_state_values() -> None:
    assert [parse_state(v) for v in (None, "4", "04", "8", "9", "x", "", "4\0")] == [None, 4, 4, 8, -1, -1, -1, 4]


def test_rate_limited_log_says_how_many_it_dropped() -> None:
    seen: list[dict[str, object]] = []

    class Sink:
        def warning(self, event: str, **kw: object) -> None:
            seen.append({"event": event, **kw})

    rl = RateLimitedLog(Sink(), burst=3, period=3600)
    for i in range(10):
        rl.warning("guest.bad", n=i)
    assert [s["n"] for s in seen] == [0, 1, 2]
    rl._window_start -= 3600
    rl.warning("guest.bad", n=10)
    assert seen[-1] == {"event": "guest.bad", "n": 10, "suppressed": 7}
