"""Tests for onceflow.operators.windows: assigners, firing, lateness, errors, snapshots."""

from __future__ import annotations

import itertools
import pickle
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onceflow.errors import DataError, PlanError
from onceflow.operators import agg
from onceflow.operators.keygroups import key_group_range
from onceflow.operators.logic import LATE, MAIN, OperatorContext
from onceflow.operators.windows import Session, Sliding, Tumbling, Window, WindowAggregate, WindowAggregateLogic

CTX = OperatorContext("window_1")
Row = dict[str, Any]


def build(
    window: Window,
    aggregates: dict[str, agg.Aggregation] | None = None,
    *,
    keys: Sequence[str] = ("k",),
    lateness: int = 0,
    ctx: OperatorContext = CTX,
    resume_state: pa.Table | Sequence[pa.Table] | None = None,
) -> WindowAggregateLogic:
    op = WindowAggregate(
        window,
        keys=list(keys),
        time_column="t",
        aggregates=aggregates if aggregates is not None else {"n": agg.count(), "s": agg.sum("v")},
        allowed_lateness_ms=lateness,
    )
    return op.build(ctx, resume_state=resume_state)


def batch(k: list[Any], t: list[int], v: list[Any] | None = None, **extra: list[Any]) -> pa.RecordBatch:
    columns: dict[str, Any] = {"k": k, "t": pa.array(t, pa.int64())}
    columns["v"] = v if v is not None else [1] * len(k)
    columns.update(extra)
    return pa.record_batch(columns)


def main_rows(emitted: list[tuple[int, pa.RecordBatch]]) -> list[Row]:
    """The rows of the single MAIN batch (asserts there is exactly one)."""
    assert [port for port, _ in emitted] == [MAIN]
    return emitted[0][1].to_pylist()


def row(k: Any, start: int, end: int, n: int, s: Any) -> Row:
    return {"k": k, "window_start": start, "window_end": end, "n": n, "s": s}


# --- configs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Tumbling(0), "size_ms must be a positive integer"),
        (lambda: Tumbling(10, offset_ms=10), "offset_ms \\(10\\) must be smaller than size_ms"),
        (lambda: Tumbling(1.5), "size_ms must be a positive integer"),  # type: ignore[arg-type]
        (lambda: Sliding(10, 20), "slide_ms \\(20\\) must not exceed size_ms"),
        (lambda: Sliding(10, 0), "slide_ms must be a positive integer"),
        (lambda: Sliding(10, 5, offset_ms=-1), "offset_ms must be a non-negative integer"),
        (lambda: Session(0), "gap_ms must be a positive integer"),
    ],
)
def test_window_assigners_validate(make: Any, match: str) -> None:
    with pytest.raises(PlanError, match=match):
        make()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"aggregates": {}}, "no aggregates given"),
        ({"aggregates": {"window_start": agg.count()}}, "'window_start' is reserved"),
        ({"keys": ["window_end"]}, "'window_end' is reserved"),
        ({"aggregates": {"k": agg.count()}}, "is both a key and an aggregate name"),
        ({"keys": ["k", "k"]}, "repeat a column"),
        ({"allowed_lateness_ms": -1}, "allowed_lateness_ms must be a non-negative"),
        ({"aggregates": {"n": "count"}}, "not an aggregation"),
        ({"window": 10}, "must be Tumbling, Sliding or Session"),
    ],
)
def test_window_aggregate_validates(kwargs: dict[str, Any], match: str) -> None:
    config: dict[str, Any] = {
        "window": Tumbling(10),
        "keys": ["k"],
        "time_column": "t",
        "aggregates": {"n": agg.count()},
    }
    config.update(kwargs)
    with pytest.raises(PlanError, match=match):
        WindowAggregate(**config)


def test_configs_pickle() -> None:
    op = WindowAggregate(Sliding(10, 5, 2), ["k"], "t", {"n": agg.count(), "m": agg.mean("v")}, 3)
    clone = pickle.loads(pickle.dumps(op))
    assert clone == op
    assert clone.keys == ("k",)
    assert list(clone.aggregates) == ["n", "m"]
    assert pickle.loads(pickle.dumps(Session(5))) == Session(5)


# --- tumbling ---------------------------------------------------------------------------------


def test_tumbling_fires_at_end_minus_one_sorted_by_window_then_key() -> None:
    logic = build(Tumbling(10))
    assert logic.on_batch(batch([2, 1, 2, 1, 3], [12, 3, 5, 9, 25], [10, 20, 30, 40, 50])) == []
    assert logic.on_watermark(8) == []
    assert main_rows(logic.on_watermark(9)) == [row(1, 0, 10, 2, 60), row(2, 0, 10, 1, 30)]
    assert logic.metrics() == {"late_events": 0, "open_windows": 2}
    # one batch per call, holding every window that fires, in (window_start, key) order
    assert main_rows(logic.on_watermark(40)) == [row(2, 10, 20, 1, 10), row(3, 20, 30, 1, 50)]
    assert logic.on_watermark(100) == []
    assert logic.on_eof() == []
    assert logic.metrics() == {"late_events": 0, "open_windows": 0}


def test_tumbling_combines_partials_from_many_batches() -> None:
    logic = build(Tumbling(10))
    for i in range(30):  # more than the compaction threshold of partial tables per window
        logic.on_batch(batch([i % 3], [i % 10], [i]))
    assert main_rows(logic.on_eof()) == [
        row(0, 0, 10, 10, sum(range(0, 30, 3))),
        row(1, 0, 10, 10, sum(range(1, 30, 3))),
        row(2, 0, 10, 10, sum(range(2, 30, 3))),
    ]


def test_tumbling_with_offset_and_negative_times() -> None:
    logic = build(Tumbling(10, offset_ms=3))
    logic.on_batch(batch([1, 1, 1, 1], [-8, -7, 2, 3]))
    assert main_rows(logic.on_eof()) == [row(1, -17, -7, 1, 1), row(1, -7, 3, 2, 2), row(1, 3, 13, 1, 1)]


def test_a_lower_watermark_is_ignored() -> None:
    logic = build(Tumbling(10))
    logic.on_batch(batch([1, 1], [5, 15]))
    assert main_rows(logic.on_watermark(12)) == [row(1, 0, 10, 1, 1)]
    assert logic.on_watermark(11) == []
    assert logic.on_watermark(12) == []
    assert main_rows(logic.on_watermark(19)) == [row(1, 10, 20, 1, 1)]


# --- sliding ----------------------------------------------------------------------------------


def test_sliding_assigns_each_event_to_every_window_containing_it() -> None:
    logic = build(Sliding(10, 5))
    logic.on_batch(batch(["a", "a", "b"], [1, 7, 12], [1, 2, 4]))
    assert main_rows(logic.on_watermark(4)) == [row("a", -5, 5, 1, 1)]
    assert main_rows(logic.on_watermark(9)) == [row("a", 0, 10, 2, 3)]
    assert logic.metrics()["open_windows"] == 2
    assert main_rows(logic.on_eof()) == [row("a", 5, 15, 1, 2), row("b", 5, 15, 1, 4), row("b", 10, 20, 1, 4)]


def test_sliding_size_not_a_multiple_of_slide() -> None:
    # windows [4m, 4m + 10): t=0 is in 3 windows (-8, -4, 0), t=2 in 2 (-4, 0)
    logic = build(Sliding(10, 4))
    logic.on_batch(batch([1, 1], [0, 2], [1, 2]))
    assert main_rows(logic.on_eof()) == [row(1, -8, 2, 1, 1), row(1, -4, 6, 2, 3), row(1, 0, 10, 2, 3)]


# --- sessions ---------------------------------------------------------------------------------


def test_session_windows_merge_across_batches() -> None:
    logic = build(Session(5))
    logic.on_batch(batch(["a", "a", "b"], [0, 10, 1], [1, 2, 4]))
    assert logic.metrics() == {"late_events": 0, "open_windows": 3}
    logic.on_batch(batch(["a"], [5], [8]))  # 5 - 0 and 10 - 5 are full gaps: a session of its own
    assert logic.metrics()["open_windows"] == 4
    logic.on_batch(batch(["a"], [4], [16]))  # bridges 0 and 5; 5 -> 10 is still a full gap
    assert logic.metrics()["open_windows"] == 3
    assert main_rows(logic.on_watermark(5)) == [row("b", 1, 6, 1, 4)]
    assert main_rows(logic.on_watermark(9)) == [row("a", 0, 10, 3, 25)]
    assert logic.on_watermark(13) == []
    assert main_rows(logic.on_watermark(14)) == [row("a", 10, 15, 1, 2)]
    assert logic.metrics()["open_windows"] == 0


def test_session_fires_only_sessions_that_ended_and_keeps_the_rest() -> None:
    logic = build(Session(3))
    logic.on_batch(batch([1, 1, 2, 2, 2], [0, 2, 0, 2, 4]))
    assert main_rows(logic.on_watermark(4)) == [row(1, 0, 5, 2, 2)]
    logic.on_batch(batch([2], [6]))
    assert main_rows(logic.on_eof()) == [row(2, 0, 9, 4, 4)]


# --- keys and time columns --------------------------------------------------------------------


def test_multi_column_and_string_keys() -> None:
    logic = build(Tumbling(10), {"n": agg.count()}, keys=["region", "user"])
    logic.on_batch(
        pa.record_batch(
            {
                "region": ["eu", "us", "eu", "eu", None],
                "user": pa.array([2, 1, 1, 2, 1], pa.int32()),
                "t": [1, 2, 3, 4, 5],
            }
        )
    )
    out = logic.on_eof()[0][1]
    assert out.schema.names == ["region", "user", "window_start", "window_end", "n"]
    assert out.schema.field("user").type == pa.int32()
    assert out.to_pylist() == [
        {"region": "eu", "user": 1, "window_start": 0, "window_end": 10, "n": 1},
        {"region": "eu", "user": 2, "window_start": 0, "window_end": 10, "n": 2},
        {"region": "us", "user": 1, "window_start": 0, "window_end": 10, "n": 1},
        {"region": None, "user": 1, "window_start": 0, "window_end": 10, "n": 1},
    ]


@pytest.mark.parametrize("window", [Tumbling(10), Session(3)])
def test_no_keys_gives_one_group_per_window(window: Window) -> None:
    logic = build(window, keys=[])
    logic.on_batch(batch([1, 2, 3], [0, 1, 12], [1, 2, 4]))
    state = logic.snapshot()
    assert state.column_names[:3] == ["key_group", "window_start", "window_end"]
    assert set(state.column("key_group").to_pylist()) == {0}
    restored = build(window, keys=[], resume_state=state)
    end = 10 if isinstance(window, Tumbling) else 4
    assert restored.on_watermark(9)[0][1].to_pylist() == [{"window_start": 0, "window_end": end, "n": 2, "s": 3}]


def test_dictionary_keys_and_table_input() -> None:
    logic = build(Tumbling(10))
    logic.on_watermark(9)
    keys = pa.array(["b", "a", "b"]).dictionary_encode()
    table = pa.Table.from_batches([batch(keys.to_pylist(), [5, 12, 13])]).set_column(0, "k", keys)
    ((port, late),) = logic.on_batch(table)
    assert port == LATE and isinstance(late, pa.RecordBatch) and late.num_rows == 1
    assert main_rows(logic.on_eof()) == [row("a", 10, 20, 1, 1), row("b", 10, 20, 1, 1)]


@pytest.mark.parametrize(("unit", "scale"), [("s", 1), ("ms", 1_000), ("us", 1_000_000), ("ns", 1_000_000_000)])
def test_timestamp_time_column_converts_to_milliseconds(unit: str, scale: int) -> None:
    logic = build(Tumbling(10_000))
    seconds = [1, 9, 10, 25]
    stamps = pa.array([s * scale for s in seconds], pa.timestamp(unit, tz="UTC"))
    logic.on_batch(pa.record_batch({"k": [1, 1, 1, 1], "t": stamps, "v": [1, 2, 3, 4]}))
    assert main_rows(logic.on_watermark(19_999)) == [row(1, 0, 10_000, 2, 3), row(1, 10_000, 20_000, 1, 3)]
    assert main_rows(logic.on_eof()) == [row(1, 20_000, 30_000, 1, 4)]


def test_timestamps_round_down_to_milliseconds() -> None:
    logic = build(Tumbling(10))
    stamps = pa.array([9_999, -1], pa.timestamp("us"))  # 9.999 ms and -0.001 ms
    logic.on_batch(pa.record_batch({"k": [1, 1], "t": stamps, "v": [1, 2]}))
    assert main_rows(logic.on_eof()) == [row(1, -10, 0, 1, 2), row(1, 0, 10, 1, 1)]


def test_small_integer_time_column() -> None:
    logic = build(Tumbling(10))
    logic.on_batch(pa.record_batch({"k": [1], "t": pa.array([12], pa.uint16()), "v": [1]}))
    assert main_rows(logic.on_eof()) == [row(1, 10, 20, 1, 1)]


# --- late events and allowed lateness ---------------------------------------------------------


def test_late_events_are_counted_sent_to_late_and_change_nothing() -> None:
    logic = build(Tumbling(10))
    logic.on_batch(batch([1, 1], [1, 12], [1, 2], note=["a", "b"]))
    assert main_rows(logic.on_watermark(9)) == [row(1, 0, 10, 1, 1)]
    emitted = logic.on_batch(batch([1, 2, 1], [9, 0, 10], [4, 8, 16], note=["c", "d", "e"]))
    assert [port for port, _ in emitted] == [LATE]
    late = emitted[0][1]
    assert late.schema.names == ["k", "t", "v", "note"]
    assert late.to_pylist() == [{"k": 1, "t": 9, "v": 4, "note": "c"}, {"k": 2, "t": 0, "v": 8, "note": "d"}]
    assert logic.metrics() == {"late_events": 2, "open_windows": 1}
    assert main_rows(logic.on_eof()) == [row(1, 10, 20, 2, 18)]
    assert logic.metrics()["late_events"] == 2


def test_an_all_late_batch_emits_only_late_rows() -> None:
    logic = build(Tumbling(10))
    logic.on_watermark(100)
    ((port, late),) = logic.on_batch(batch([1], [3]))
    assert port == LATE and late.num_rows == 1
    assert logic.on_eof() == []


def test_allowed_lateness_delays_firing_and_accepts_late_events() -> None:
    logic = build(Tumbling(10), lateness=5)
    logic.on_batch(batch([1], [2], [1]))
    assert logic.on_watermark(13) == []  # end - 1 + lateness = 14
    assert logic.on_batch(batch([1], [3], [2])) == []  # behind the watermark, but within the lateness
    assert main_rows(logic.on_watermark(14)) == [row(1, 0, 10, 2, 3)]
    emitted = logic.on_batch(batch([1], [4], [4]))
    assert [port for port, _ in emitted] == [LATE]
    assert logic.metrics()["late_events"] == 1


def test_sliding_event_with_some_windows_fired_is_not_late() -> None:
    logic = build(Sliding(10, 5))
    logic.on_batch(batch([1], [0], [1]))
    assert main_rows(logic.on_watermark(9)) == [row(1, -5, 5, 1, 1), row(1, 0, 10, 1, 1)]
    assert logic.on_batch(batch([1], [7], [2])) == []  # [0, 10) fired; [5, 15) still open
    assert logic.metrics()["late_events"] == 0
    ((port, _),) = logic.on_batch(batch([1], [4], [4]))  # both of its windows fired
    assert port == LATE
    assert main_rows(logic.on_eof()) == [row(1, 5, 15, 1, 2)]


def test_session_late_events() -> None:
    logic = build(Session(5), lateness=2)
    logic.on_watermark(10)
    emitted = logic.on_batch(batch([1, 1, 1, 1], [3, 4, 5, 20], [1, 2, 4, 8]))  # t + 5 - 1 + 2 <= 10: late
    assert [(port, out.column("t").to_pylist()) for port, out in emitted] == [(LATE, [3, 4])]
    assert main_rows(logic.on_eof()) == [row(1, 5, 10, 1, 4), row(1, 20, 25, 1, 8)]
    assert logic.metrics() == {"late_events": 2, "open_windows": 0}


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("columns", "column", "fragment"),
    [
        ({"t": [1], "v": [1]}, "k", "key column 'k' is missing from the input (columns: t, v); key by"),
        ({"k": [1], "v": [1]}, "t", "time column 't' is missing from the input (columns: k, v)"),
        ({"k": [1], "t": [1]}, "v", "sum('v') reads column 'v', which is missing from the input (columns: k, t)"),
        ({"k": [1], "t": ["1"], "v": [1]}, "t", "time column 't' has type string, expected an integer"),
        ({"k": [1], "t": [1.5], "v": [1]}, "t", "time column 't' has type double"),
        ({"k": [1], "t": pa.array([None], pa.int64()), "v": [1]}, "t", "time column 't' has 1 null values"),
        ({"k": [[1]], "t": [1], "v": [1]}, "k", "key column 'k' has type list<item: int64>, which cannot be a key"),
        ({"k": [1], "t": [1], "v": ["x"]}, "v", "sum('v') needs an integer or floating-point column"),
        ({"k": [1], "t": pa.array([2**64 - 1], pa.uint64()), "v": [1]}, "t", "has values beyond int64 ms"),
    ],
)
def test_bad_input_is_a_data_error_naming_operator_and_column(
    columns: dict[str, Any], column: str, fragment: str
) -> None:
    for window in (Tumbling(10), Session(10)):
        logic = build(window, ctx=OperatorContext("window_7"))
        with pytest.raises(DataError) as caught:
            logic.on_batch(pa.record_batch(columns))
        message = str(caught.value)
        assert caught.value.operator == "window_7"
        assert caught.value.column == column
        assert message.startswith("operator 'window_7': ")
        assert fragment in message
        assert message == message.lower()


def test_empty_batches_are_validated_too() -> None:
    logic = build(Tumbling(10))
    empty = pa.record_batch({name: pa.array([], pa.int64()) for name in ("k", "t", "v")})
    assert logic.on_batch(empty) == []
    with pytest.raises(DataError, match="time column 't' is missing"):
        logic.on_batch(empty.drop_columns(["t"]))


def test_a_type_change_between_batches_is_a_data_error() -> None:
    logic = build(Tumbling(10))
    logic.on_batch(batch([1], [1]))
    logic.on_batch(pa.record_batch({"k": pa.array([2], pa.int32()), "t": [1], "v": [1]}))  # widens: fine
    with pytest.raises(DataError) as caught:
        logic.on_batch(batch(["x"], [1]))
    assert caught.value.column == "k"
    assert "column 'k' changed type from int64 to string" in str(caught.value)


# --- snapshot and restore ---------------------------------------------------------------------


def run(logic: WindowAggregateLogic, steps: Sequence[pa.RecordBatch | int]) -> list[Row]:
    rows: list[Row] = []
    for step in steps:
        emitted = logic.on_watermark(step) if isinstance(step, int) else logic.on_batch(step)
        rows += [r for port, out in emitted if port == MAIN for r in out.to_pylist()]
    return rows


@pytest.mark.parametrize("window", [Tumbling(10), Sliding(10, 5), Session(4)])
def test_snapshot_restore_round_trip(window: Window) -> None:
    aggregates = {"n": agg.count(), "s": agg.sum("v"), "lo": agg.min("v"), "m": agg.mean("v")}
    first = [batch([1, 2, 1], [0, 3, 11], [1, 2, None]), 5, batch([2, 3], [8, 14], [4, 5])]
    second = [12, batch([1, 3, 3], [13, 20, 2], [6, 7, 8]), batch([1], [40], [9])]
    whole = build(window, aggregates)
    expected = run(whole, [*first, *second]) + main_rows(whole.on_eof())
    assert whole.metrics()["late_events"] == 1  # (3, t=2) is behind watermark 12

    before = build(window, aggregates)
    rows = run(before, first)
    state = before.snapshot()
    assert state.column_names[:4] == ["key_group", "k", "window_start", "window_end"]
    assert state.schema.field("key_group").type == pa.int32()
    assert state.column_names[4:] == ["n.count", "s.sum", "lo.min", "m.sum", "m.count"]
    assert state.schema.metadata[b"onceflow.watermark"] == b"5"
    after = build(window, aggregates, resume_state=pickle.loads(pickle.dumps(state)))
    rows += run(after, second) + main_rows(after.on_eof())
    assert rows == expected
    assert after.metrics()["late_events"] == 1


def test_restore_splits_state_by_key_group() -> None:
    events = batch(list(range(20)), [i % 10 for i in range(20)], list(range(20)))
    single = build(Tumbling(10))
    single.on_batch(events)
    state = single.snapshot()
    assert state.schema.metadata[b"onceflow.watermark"] == b""
    outputs = []
    for subtask in range(2):
        ctx = OperatorContext("window_1", subtask=subtask, parallelism=2, key_groups=key_group_range(subtask, 2, 128))
        restored = build(Tumbling(10), ctx=ctx, resume_state=state)
        groups = restored.snapshot().column("key_group").to_pylist()
        assert groups and all(g in ctx.key_groups for g in groups)
        outputs.append(main_rows(restored.on_eof()))
    assert 0 < len(outputs[0]) < 20
    merged = sorted(outputs[0] + outputs[1], key=lambda r: r["k"])
    assert merged == [row(i, 0, 10, 1, i) for i in range(20)]


def test_snapshot_before_any_batch_and_of_an_empty_state() -> None:
    logic = build(Tumbling(10))
    logic.on_watermark(15)
    state = logic.snapshot()
    assert state.num_rows == 0
    restored = build(Tumbling(10), resume_state=state)
    ((port, _),) = restored.on_batch(batch([1], [1]))  # the restored watermark still makes it late
    assert port == LATE
    logic.on_batch(batch([1], [25]))
    logic.on_eof()
    state = logic.snapshot()
    assert state.num_rows == 0 and "s.sum" in state.column_names


def test_restore_rejects_a_foreign_table() -> None:
    state = build(Tumbling(10)).snapshot()
    other = pa.table({"key_group": pa.array([0], pa.int32()), "window_start": [0], "window_end": [10], "k": [1]})
    with pytest.raises(DataError, match=r"lacks column 'n\.count'"):
        build(Tumbling(10), resume_state=other)
    logic = build(Tumbling(10))
    logic.on_batch(batch([1], [1]))
    with pytest.raises(DataError, match="windows of another size"):
        build(Tumbling(20), resume_state=logic.snapshot())
    assert state.num_rows == 0


# --- property: random batch splits and watermarks against a pure-Python reference ------------


def reference(window: Window, events: list[tuple[int, str, int, int | None]]) -> list[tuple[Any, ...]]:
    """Windows computed the obvious way: (start, end, k1, k2, count, sum, min, max, mean) rows."""
    groups: dict[tuple[int, int, int, str], list[int | None]] = defaultdict(list)
    if isinstance(window, Session):
        by_key: dict[tuple[int, str], list[tuple[int, int | None]]] = defaultdict(list)
        for k1, k2, t, v in events:
            by_key[(k1, k2)].append((t, v))
        for (k1, k2), items in by_key.items():
            items.sort(key=lambda item: item[0])
            session: list[tuple[int, int | None]] = []
            for t, v in items:
                if session and t - session[-1][0] >= window.gap_ms:
                    groups[(session[0][0], session[-1][0] + window.gap_ms, k1, k2)] += [x for _, x in session]
                    session = []
                session.append((t, v))
            groups[(session[0][0], session[-1][0] + window.gap_ms, k1, k2)] += [x for _, x in session]
    else:
        size = window.size_ms
        slide = window.slide_ms if isinstance(window, Sliding) else size
        for k1, k2, t, v in events:
            start = t - (t - window.offset_ms) % slide
            while start + size > t:
                groups[(start, start + size, k1, k2)].append(v)
                start -= slide
    out = []
    for (start, end, k1, k2), values in groups.items():
        present = [x for x in values if x is not None]
        total = sum(present) if present else None
        out.append(
            (
                start,
                end,
                k1,
                k2,
                len(values),
                total,
                min(present, default=None),
                max(present, default=None),
                total / len(present) if present else None,
            )
        )
    return sorted(out, key=lambda r: (r[0], r[2], r[3], r[1]))


windows_strategy = st.one_of(
    st.builds(Tumbling, st.integers(1, 12), st.just(0)).flatmap(
        lambda w: st.builds(Tumbling, st.just(w.size_ms), st.integers(0, w.size_ms - 1))
    ),
    st.integers(1, 12).flatmap(
        lambda slide: st.builds(Sliding, st.integers(slide, 3 * slide + 2), st.just(slide), st.integers(0, slide - 1))
    ),
    st.builds(Session, st.integers(1, 8)),
)


@settings(max_examples=120, deadline=None)
@given(
    window=windows_strategy,
    string_keys=st.booleans(),
    lateness=st.sampled_from([0, 0, 1, 7]),
    events=st.lists(
        st.tuples(
            st.integers(0, 3), st.sampled_from(["x", "y"]), st.integers(-20, 60), st.none() | st.integers(-50, 50)
        ),
        max_size=40,
    ),
    data=st.data(),
)
def test_matches_reference_for_any_batching_and_valid_watermarks(
    window: Window,
    string_keys: bool,
    lateness: int,
    events: list[tuple[int, str, int, int | None]],
    data: st.DataObject,
) -> None:
    if not string_keys:  # one integer key column: the numpy path
        events = [(k1, "x", t, v) for k1, _, t, v in events]
    keys = ["k1", "k2"] if string_keys else ["k1"]
    aggregates = {"n": agg.count(), "s": agg.sum("v"), "lo": agg.min("v"), "hi": agg.max("v"), "m": agg.mean("v")}
    op = WindowAggregate(window, keys, "t", aggregates, allowed_lateness_ms=lateness)
    logic = op.build(CTX)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(events)), max_size=6), label="cuts"))
    snapshot_at = data.draw(st.none() | st.integers(0, len(cuts)), label="snapshot_at")
    bounds = [0, *cuts, len(events)]
    watermark: int | None = None
    output: list[tuple[Any, ...]] = []

    def collect(emitted: list[tuple[int, pa.RecordBatch]], limit: int | None) -> None:
        assert all(port == MAIN for port, _ in emitted)
        assert len(emitted) <= 1
        for _, out in emitted:
            assert out.schema.names == [*keys, "window_start", "window_end", *aggregates]
            rows = [
                (r["window_start"], r["window_end"], r["k1"], r.get("k2", "x"), *(r[a] for a in aggregates))
                for r in out.to_pylist()
            ]
            assert [(r[0], r[2], r[3]) for r in rows] == sorted((r[0], r[2], r[3]) for r in rows)
            assert limit is None or all(r[1] - 1 + lateness <= limit for r in rows)
            output.extend(rows)

    for i, (begin, end) in enumerate(itertools.pairwise(bounds)):
        if i == snapshot_at:
            logic = op.build(CTX, resume_state=logic.snapshot())
        part = events[begin:end]
        columns = {
            "k1": pa.array([e[0] for e in part], pa.int64()),
            "k2": pa.array([e[1] for e in part], pa.string()),
            "t": pa.array([e[2] for e in part], pa.int64()),
            "v": pa.array([e[3] for e in part], pa.int64()),
        }
        assert logic.on_batch(pa.record_batch(columns)) == []
        remaining = [e[2] for e in events[end:]]
        highest = min(remaining) - 1 if remaining else 100
        lowest = -30 if watermark is None else watermark
        if highest >= lowest and data.draw(st.booleans(), label="advance"):
            watermark = data.draw(st.integers(lowest, highest), label="watermark")
            collect(logic.on_watermark(watermark), watermark)
    collect(logic.on_eof(), None)
    assert logic.metrics() == {"late_events": 0, "open_windows": 0}
    assert sorted(output, key=lambda r: (r[0], r[2], r[3], r[1])) == reference(window, events)


@pytest.mark.parametrize("column", [
    pa.array(["x", "y", "x", None], pa.string_view()),
    pa.array([b"x", b"y", b"x", None], pa.binary_view()),
    pa.array([1.5, 2.0, 1.5, None], pa.float32()).cast(pa.float16()),
    pa.array(["1.50", "2.00", "1.50", None]).cast(pa.decimal128(6, 2)),
    pa.array([1, 2, 1, None], pa.int32()).view(pa.time32("s")),
    pa.array([1, 2, 1, None], pa.timestamp("ms", tz="UTC")),
], ids=lambda column: str(column.type))
@pytest.mark.parametrize("window", [Tumbling(10), Session(5)], ids=["tumbling", "session"])
def test_every_key_type_the_router_takes_aggregates_snapshots_and_goes_late(column: pa.Array, window: Window) -> None:
    logic = build(window, {"n": agg.count()})
    assert logic.on_batch(pa.record_batch({"k": column, "t": pa.array([1, 2, 3, 4], pa.int64()),
                                           "tag": pa.array(["a", "b", "c", "d"], pa.string_view())})) == []
    restored = build(window, {"n": agg.count()}, resume_state=logic.snapshot())
    fired = main_rows(restored.on_watermark(100))
    assert sorted((r["k"] is None, r["n"]) for r in fired) == [(False, 1), (False, 2), (True, 1)]
    [(port, late)] = restored.on_batch(pa.record_batch({"k": column.slice(1, 1), "t": pa.array([1], pa.int64()),
                                                        "tag": pa.array(["e"], pa.string_view())}))
    assert port == LATE and late.column("tag").to_pylist() == ["e"]
    assert late.schema.field("tag").type == pa.string_view()
