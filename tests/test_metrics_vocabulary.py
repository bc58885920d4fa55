"""The metric vocabulary has one source, the C data plane (native/dataplane/stats.c): the exporter's
labels and bucket bounds are read from it, and every other copy must agree with it."""

from __future__ import annotations

from xenblk import dataplane, metrics

lib = dataplane.lib
ffi = dataplane.ffi


def _c_names(table: object, count: int) -> list[str]:
    out = []
    for i in range(count):
        p = table[i]  # type: ignore[index]
        assert p != ffi.NULL, f"slot {i} has no name: an enum value was added without one in stats.c"
        out.append(ffi.string(p).decode())
    return out


def test_every_enum_value_has_a_distinct_name() -> None:
    for table, count in (
        (lib.xb_stat_op_names, lib.XB_STAT_OPS),
        (lib.xb_refusal_names, lib.XB_REFUSE_REASONS),
        (lib.xb_error_reason_names, lib.XB_ERR_REASONS),
    ):
        names = _c_names(table, count)
        assert all(names) and len(set(names)) == len(names), names


def test_exporter_reads_the_c_vocabulary() -> None:
    assert list(metrics.OPS) == _c_names(lib.xb_stat_op_names, lib.XB_STAT_OPS)
    assert list(metrics.REFUSALS) == _c_names(lib.xb_refusal_names, lib.XB_REFUSE_REASONS)
    assert list(metrics.ERRORS) == _c_names(lib.xb_error_reason_names, lib.XB_ERR_REASONS)
    assert metrics.OPS[lib.XB_STAT_BARRIER] == "barrier"
    assert metrics.REFUSALS[lib.XB_REFUSE_UNSUPPORTED] == "unsupported"
    assert metrics.ERRORS[lib.XB_ERR_QUOTA] == "quota"


def test_the_python_names_are_the_native_modules() -> None:
    # xenblk.dataplane names its counters (QueueStats.refusal(), op_named()), metrics publishes them
    assert (dataplane.OPS, dataplane.REFUSALS, dataplane.ERRORS) == (metrics.OPS, metrics.REFUSALS, metrics.ERRORS)
    assert tuple(ffi.string(lib.xb_stat_op_names[i]).decode() for i in range(lib.XB_STAT_OPS)) == dataplane.OPS


def test_bucket_bounds_match_the_counters() -> None:
    lat = [int(lib.xb_lat_bounds_ns[i]) for i in range(lib.XB_LAT_BUCKETS - 1)]
    seg = [int(lib.xb_seg_bounds[i]) for i in range(lib.XB_SEG_BUCKETS - 1)]
    assert lat == sorted(set(lat)) and seg == sorted(set(seg))
    assert tuple(ns / 1e9 for ns in lat) == metrics.LAT_BOUNDS_S
    assert tuple(seg) == metrics.SEG_BOUNDS
    # one finite bound per bucket but the last (+Inf), for every histogram the queues count
    st = ffi.new("struct xb_queue_stats *")
    assert len(st.op[0].lat_buckets) == len(st.op[0].storage_buckets) == len(lat) + 1
    assert len(st.seg_buckets) == len(seg) + 1
    assert len(st.op) == len(metrics.OPS)
    assert len(st.refusals) == len(metrics.REFUSALS)
    assert len(st.errors) == len(metrics.ERRORS)


def test_exported_labels_are_the_published_ones() -> None:
    # Dashboards and alerts select on these labels: a rename is a visible change, made here on purpose.
    assert metrics.OPS == ("read", "write", "flush", "discard", "barrier")
    assert metrics.REFUSALS == (
        "bad_op", "nseg", "sect", "range", "align", "readonly", "secure", "indirect", "grant", "unsupported",
    )  # fmt: skip
    assert metrics.ERRORS == ("io", "nospc", "grant", "other", "quota")
    assert metrics.LAT_BOUNDS_S[0] == 0.00001 and metrics.LAT_BOUNDS_S[-1] == 10.0
    assert metrics.SEG_BOUNDS == (1, 2, 4, 8, 11, 16, 32, 64, 128)
