"""Tests for onceflow.operators.dedupe: exact outputs, generations and expiry, snapshots, fp rate, memory, errors."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onceflow.errors import DataError, PlanError
from onceflow.operators.dedupe import Dedupe, DedupeLogic
from onceflow.operators.keygroups import key_group_range, key_groups_of
from onceflow.operators.logic import MAIN, OperatorContext
from onceflow.operators.watermark import BoundedOutOfOrderness
from onceflow.runtime.dataflow import Dataflow
from onceflow.testing.sink import TestingSink
from onceflow.testing.source import TestingSource

CTX = OperatorContext("dedupe_1")
MODES = ["bloom", "exact"]


def build(mode: Any = "exact", *, within_ms: int = 1_000, ctx: OperatorContext = CTX, on: Any = "id",
          resume_state: Any = None, **options: Any) -> DedupeLogic:
    return Dedupe(on, within_ms, time_column="t", mode=mode, **options).build(ctx, resume_state=resume_state)


def batch(ids: list[Any], times: list[int] | None = None, **extra: list[Any]) -> pa.RecordBatch:
    times = times if times is not None else [0] * len(ids)
    return pa.record_batch({"id": ids, "t": pa.array(times, pa.int64()), **extra})


def passed(logic: DedupeLogic, data: pa.RecordBatch) -> list[Any]:
    emitted = logic.on_batch(data)
    assert all(port == MAIN for port, _ in emitted) and len(emitted) <= 1
    return emitted[0][1].column("id").to_pylist() if emitted else []


# --- outputs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_first_occurrences_pass_with_their_rows_and_schema(mode: str) -> None:
    logic = build(mode)
    data = batch([3, 1, 3, 2, 1], [10, 11, 12, 13, 14], v=["a", "b", "c", "d", "e"])
    [(port, out)] = logic.on_batch(data)
    assert port == MAIN and out.schema == data.schema
    assert out.to_pydict() == {"id": [3, 1, 2], "t": [10, 11, 13], "v": ["a", "b", "d"]}
    assert passed(logic, batch([2, 4, 4, 3], [20, 21, 22, 23])) == [4]
    assert logic.on_batch(batch([1, 1], [30, 31])) == []
    assert logic.on_batch(batch([], [])) == []
    m = logic.metrics()
    assert (m["items_seen"], m["duplicates_dropped"]) == (11, 7)


@pytest.mark.parametrize("mode", MODES)
def test_a_batch_without_repeats_passes_unchanged(mode: str) -> None:
    logic = build(mode)
    data = batch([1, 2, 3], [0, 1, 2])
    assert logic.on_batch(data) == [(MAIN, data)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("column", [
    pa.array(["x", "y", "x", "z"]),
    pa.array([1.5, 2.5, 1.5, -0.0]),
    pa.array([b"x", b"yy", b"x", b""]),
    pa.array(["x", "y", "x", "z"]).dictionary_encode(),
    pa.array([10, 20, 10, 30], pa.timestamp("ms")),
    pa.array([2**64 - 1, 5, 2**64 - 1, 2**63], pa.uint64()),
    pa.array([-1, 0, -1, 1], pa.int8()),
    pa.array([10, 20, 10, 30], pa.date32()),
    pa.array([10, 20, 10, 30], pa.time32("s")),
    pa.array(["1.50", "2.00", "1.50", "-1.50"], pa.string()).cast(pa.decimal128(5, 2)),
    pa.array(["x", "y", "x", "z"], pa.string_view()),
    pa.array([b"x", b"yy", b"x", b""], pa.binary_view()),
], ids=lambda column: str(column.type))
def test_id_column_types(mode: str, column: pa.Array) -> None:
    logic = build(mode)
    data = pa.record_batch({"id": column, "t": pa.array([0, 1, 2, 3], pa.int64())})
    [(_, out)] = logic.on_batch(data)
    assert out.column("t").to_pylist() == [0, 1, 3]


@pytest.mark.parametrize("mode", MODES)
def test_several_id_columns(mode: str) -> None:
    logic = build(mode, on=["user", "seq"])
    data = pa.record_batch({"user": ["a", "a", "b", "a"], "seq": [1, 2, 1, 1], "t": [0, 1, 2, 3]})
    [(_, out)] = logic.on_batch(data)
    assert out.column("t").to_pylist() == [0, 1, 2]


def test_exact_mode_keeps_integer_ids_themselves_so_it_is_exact() -> None:
    logic = build("exact")
    ids = np.arange(0, 200_000, dtype=np.int64) * 7919
    assert len(passed(logic, batch(ids.tolist(), [0] * len(ids)))) == len(ids)
    assert logic.on_batch(batch(ids[::1000].tolist(), [1] * 200)) == []
    state = logic.snapshot()
    assert state.schema.metadata[b"onceflow.key_encoding"] == b"value"
    assert sorted(state.column("key").to_numpy().view(np.int64).tolist()) == ids.tolist()


# --- generations, expiry, out-of-order events ------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_an_id_is_remembered_until_the_watermark_passes_its_horizon(mode: str) -> None:
    logic = build(mode, within_ms=1_000, generations=3)  # generations of 500 ms
    assert passed(logic, batch([1], [700])) == [1]  # generation [500, 1000)
    for watermark in (900, 1_500, 1_699, 1_998):  # < end of generation - 1 + within_ms = 1999
        logic.on_watermark(watermark)
        assert logic.on_batch(batch([1], [watermark + 1])) == [], watermark
    logic.on_watermark(1_999)
    assert passed(logic, batch([1], [2_000])) == [1]
    assert logic.on_batch(batch([1], [2_001])) == []


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    mode=st.sampled_from(MODES),
    within_ms=st.integers(1, 5_000),
    generations=st.integers(2, 6),
)
def test_no_repeat_passes_inside_the_horizon_and_no_unique_id_is_dropped(
    data: st.DataObject, mode: str, within_ms: int, generations: int
) -> None:
    """A reference model: a repeat of an id that passed at t0 is dropped while watermark < t0 + within_ms.

    Events come out of order (anywhere ahead of the watermark, and some late);
    watermarks rise at random points. In exact mode an id that never passed
    must pass; the filters are roomy, so bloom mode must do the same here.
    """
    logic = build(mode, within_ms=within_ms, generations=generations, expected_items=100_000, fp_rate=1e-6)
    span = math.ceil(within_ms / (generations - 1))
    watermark: int | None = None
    passed_at: dict[int, int] = {}  # id -> event time it last passed with
    for _ in range(data.draw(st.integers(1, 12))):
        if data.draw(st.booleans()):
            watermark = (watermark or 0) + data.draw(st.integers(0, 3 * within_ms))
            logic.on_watermark(watermark)
        low = (watermark or 0) - 2 * within_ms
        rows = data.draw(st.lists(st.tuples(st.integers(0, 30), st.integers(low, low + 4 * within_ms)), max_size=20))
        out = passed(logic, batch([i for i, _ in rows], [t for _, t in rows]))
        expected_new = []
        in_batch: set[int] = set()
        for key, time in rows:
            if key in in_batch:
                continue
            in_batch.add(key)
            if key not in passed_at:
                expected_new.append(key)  # never passed: must pass
            elif watermark is None or watermark < passed_at[key] + within_ms:
                pass  # inside the horizon: must be dropped
            elif watermark >= passed_at[key] + within_ms + 2 * span:
                expected_new.append(key)  # generation long gone: passes again
            else:
                expected_new.append(key) if key in out else None  # between: either is allowed
            if key in out:
                passed_at[key] = time if watermark is None else max(time, (watermark + 1 - within_ms) // span * span)
        assert out == expected_new


def test_out_of_order_events_inside_the_horizon_are_recognised() -> None:
    logic = build("bloom", within_ms=10_000, expected_items=1_000)
    logic.on_watermark(5_000)
    assert passed(logic, batch([1, 2, 3], [14_000, 6_000, 9_000])) == [1, 2, 3]
    logic.on_watermark(14_000)
    assert logic.on_batch(batch([2, 3, 1], [15_000, 5_000, 1_000])) == []
    assert logic.metrics()["beyond_horizon"] == 1  # t = 1000 was beyond the horizon: its generation expired
    logic.on_watermark(15_999)
    assert logic.on_batch(batch([2], [16_000])) == []  # t = 6000: remembered until w >= 16000
    logic.on_watermark(16_000 + 3_333)
    assert passed(logic, batch([2, 3], [20_000, 20_000])) == [2]


def test_a_late_new_event_is_remembered_in_the_oldest_live_generation() -> None:
    logic = build("exact", within_ms=1_000, generations=2)
    logic.on_watermark(10_000)
    assert passed(logic, batch([5], [100])) == [5]  # far beyond the horizon
    assert logic.metrics()["beyond_horizon"] == 1
    assert logic.on_batch(batch([5], [10_500])) == []
    logic.on_watermark(10_998)
    assert logic.on_batch(batch([5], [11_000])) == []
    logic.on_watermark(20_000)
    assert passed(logic, batch([5], [20_001])) == [5]


@pytest.mark.parametrize("mode", MODES)
def test_no_watermark_means_nothing_expires(mode: str) -> None:
    logic = build(mode, within_ms=10)
    assert passed(logic, batch([1], [0])) == [1]
    assert logic.on_batch(batch([1], [10**9])) == []


@pytest.mark.parametrize("mode", MODES)
def test_the_end_of_time_watermark_drops_everything(mode: str) -> None:
    logic = build(mode)
    passed(logic, batch([1, 2], [0, 5_000]))
    assert logic.metrics()["generations"] == 2
    assert logic.on_watermark(2**63 - 1) == [] and logic.on_eof() == []
    assert logic.metrics()["generations"] == 0 and logic.state_bytes == 0


# --- memory ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_memory_stays_flat_over_a_long_stream(mode: str) -> None:
    """50 horizons of 2,000 new ids per 1,000 ms each, plus resends: the state stops growing."""
    logic = build(mode, within_ms=1_000, generations=4, expected_items=2_000)
    rng = np.random.default_rng(5)
    sizes: list[int] = []
    live: list[int] = []
    next_id = 0
    ever: set[int] = set()
    for step in range(150):  # 150 steps of 333 ms: 50 horizons, about 150 generations
        start = step * 333
        ids = np.arange(next_id, next_id + 666)
        next_id += 666
        resent = rng.integers(max(0, next_id - 1_500), next_id, 300)  # resends within ~750 ms
        times = start + rng.integers(0, 333, 966)
        out = passed(logic, batch(np.concatenate([ids, resent]).tolist(), times.tolist()))
        assert not ever & set(out), "a resend passed again inside the horizon"
        ever |= set(out)
        logic.on_watermark(start + 332)
        sizes.append(logic.state_bytes)
        live.append(logic.metrics()["generations"])
    assert max(live) <= 4
    if mode == "exact":
        assert ever == set(range(next_id))
    else:  # a unique id dropped as a false positive passes at its resend, if it has one
        assert len(ever) > 0.99 * next_id
    if mode == "bloom":
        assert len(set(sizes[5:])) == 1  # the same few filters, rotated
    else:
        assert max(sizes[5:]) <= 1.3 * min(sizes[5:])


def test_bloom_sizing_splits_expected_items_over_subtasks_and_generations() -> None:
    ctx = OperatorContext("dedupe_1", subtask=1, parallelism=4, key_groups=key_group_range(1, 4, 128))
    logic = build("bloom", ctx=ctx, expected_items=120_000, generations=4, fp_rate=0.01)
    passed(logic, batch([1], [0]))
    [bloom] = logic._ids.generations[0].filters()
    assert bloom.capacity == 10_000  # 120,000 / 4 subtasks / 3 generations per within_ms
    per_generation = 1 - 0.99 ** 0.25
    assert bloom.num_bits == math.ceil(-10_000 * math.log(per_generation) / math.log(2) ** 2)
    assert bloom.num_hashes >= 1


@pytest.mark.parametrize(("expected_items", "fp_rate"), [(1, 0.999), (10, 0.9), (10**9, 1e-9)])
def test_the_number_of_probes_is_never_zero(expected_items: int, fp_rate: float) -> None:
    logic = build("bloom", expected_items=expected_items, fp_rate=fp_rate)
    assert logic._ids.num_hashes >= 1 and logic._ids.num_bits >= 1


# --- false positives -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fp_rate", [0.01, 0.001])
def test_bloom_false_positive_rate_at_the_designed_load_is_within_2x(fp_rate: float) -> None:
    """Unique ids only, 20,000 per within_ms (the designed load), over 8 horizons, seed 42."""
    within_ms, per_horizon = 4_000, 20_000
    logic = build("bloom", within_ms=within_ms, expected_items=per_horizon, fp_rate=fp_rate)
    rng = np.random.default_rng(42)
    total = dropped = 0
    for step in range(80):
        start = step * within_ms // 10
        ids = rng.integers(0, 2**62, per_horizon // 10)
        times = start + np.sort(rng.integers(0, within_ms // 10, len(ids)))
        total += len(ids)
        dropped += len(ids) - len(passed(logic, batch(ids.tolist(), times.tolist())))
        logic.on_watermark(int(times.max()))
    measured = dropped / total
    assert measured <= 2 * fp_rate, measured
    assert logic.metrics()["estimated_fp_rate"] <= 2 * fp_rate


def test_metrics_report_fill_and_fp_rate_per_generation() -> None:
    logic = build("bloom", within_ms=3_000, expected_items=3_000, generations=4)
    for g in range(3):
        passed(logic, batch(list(range(g * 1_000, g * 1_000 + 1_000)), [g * 1_000] * 1_000))
    m = logic.metrics()
    assert m["generations"] == 3
    assert {"fill_ratio_g0", "fp_rate_g0", "items_g0", "fill_ratio_g2", "estimated_fp_rate"} <= set(m)
    assert m["items_g2"] == 1_000 and 980 <= m["items_g0"] <= 1_000  # the odd false positive is not added
    assert 0.4 < m["fill_ratio_g0"] < 0.6
    assert m["fp_rate_g0"] == pytest.approx(m["fill_ratio_g0"] ** logic._ids.num_hashes)
    assert m["estimated_fp_rate"] == pytest.approx(1 - math.prod(1 - m[f"fp_rate_g{i}"] for i in range(3)))
    assert m["estimated_fp_rate"] < 0.01
    assert m["state_bytes"] == 3 * ((logic._ids.num_bits + 63) // 64 * 8)


# --- snapshots -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_snapshot_and_restore_recognise_old_ids_and_keep_counters(mode: str) -> None:
    logic = build(mode, within_ms=1_000, expected_items=10_000)
    passed(logic, batch(list(range(100)), list(range(0, 2_000, 20))))
    logic.on_watermark(900)
    state = logic.snapshot()
    assert state.column("key_group").type == pa.int32()
    assert state.schema.metadata[b"onceflow.state"] == b"dedupe"
    restored = build(mode, within_ms=1_000, expected_items=10_000, resume_state=state)
    assert restored.on_batch(batch(list(range(100)), [1_000] * 100)) == []
    assert passed(restored, batch([100, 5], [1_000, 1_000])) == [100]
    assert restored.metrics()["items_seen"] == 202
    assert restored.metrics()["duplicates_dropped"] == 101
    assert restored.metrics()["generations"] == logic.metrics()["generations"]
    restored.on_watermark(10_000)  # the restored watermark and generations keep expiring
    assert passed(restored, batch([1, 2], [10_001, 10_001])) == [1, 2]


def test_bloom_snapshot_rows_are_one_per_filter_with_the_bits() -> None:
    ctx = OperatorContext("dedupe_1", subtask=1, parallelism=2, key_groups=key_group_range(1, 2, 128))
    logic = build("bloom", ctx=ctx, within_ms=1_000, expected_items=1_000)
    passed(logic, batch([1, 2, 3], [0, 400, 800]))
    state = logic.snapshot()
    assert state.num_rows == 3
    assert set(state.column("key_group").to_pylist()) == {-1}
    assert set(state.column("subtask").to_pylist()) == {1}
    assert state.column("generation").to_pylist() == [0, 1, 2]
    assert set(zip(state.column("key_group_start").to_pylist(), state.column("key_group_end").to_pylist(),
                   strict=True)) == {(64, 128)}
    assert state.column("bits").type == pa.large_binary()
    assert state.column("items").to_pylist() == [1, 1, 1]
    restored = build("bloom", ctx=ctx, within_ms=1_000, expected_items=1_000, resume_state=state)
    assert restored.state_bytes == logic.state_bytes  # own filters back: no second copy
    empty = build("bloom").snapshot()
    assert empty.num_rows == 0 and empty.schema.metadata[b"onceflow.mode"] == b"bloom"


def test_exact_snapshot_is_per_key_group_and_restores_at_another_parallelism() -> None:
    ids = list(range(5_000))
    one = build("exact", within_ms=1_000)
    passed(one, batch(ids, [i % 2_000 for i in ids]))
    state = one.snapshot()
    assert state.num_rows == 5_000
    groups = state.column("key_group").to_numpy()
    assert groups.min() >= 0 and groups.max() < 128 and len(np.unique(groups)) == 128
    parts = []
    for subtask in range(3):
        ctx = OperatorContext("dedupe_1", subtask, 3, 128, key_group_range(subtask, 3, 128))
        restored = build("exact", within_ms=1_000, ctx=ctx, resume_state=state)
        parts.append(restored.snapshot())
        mine = [i for i, g in zip(ids, key_groups_of(batch(ids), ["id"]), strict=True) if g in ctx.key_groups]
        assert len(passed(restored, batch(mine, [0] * len(mine)))) == 0  # the ids routed to this subtask
        others = sorted(set(ids) - set(mine))
        assert passed(restored, batch(others, [0] * len(others))) == others  # not this subtask's state
    sizes = [p.num_rows for p in parts]
    assert sum(sizes) == 5_000 and min(sizes) > 1_000  # each subtask kept only its key groups
    back = build("exact", within_ms=1_000, resume_state=parts)
    assert back.on_batch(batch(ids, [0] * len(ids))) == []  # back to one subtask, merged


def test_bloom_state_restored_at_another_parallelism_has_no_false_negatives() -> None:
    ids = list(range(3_000))
    tables = []
    for subtask in range(2):
        ctx = OperatorContext("dedupe_1", subtask, 2, 128, key_group_range(subtask, 2, 128))
        logic = build("bloom", ctx=ctx, within_ms=1_000, expected_items=6_000)
        passed(logic, batch(ids, [i % 1_000 for i in ids]))  # every id to both, for the test
        tables.append(logic.snapshot())
    for parallelism in (1, 4):
        for subtask in range(parallelism):
            ctx = OperatorContext("dedupe_1", subtask, parallelism, 128, key_group_range(subtask, parallelism, 128))
            restored = build("bloom", ctx=ctx, within_ms=1_000, expected_items=6_000, resume_state=tables)
            assert restored.on_batch(batch(ids, [0] * len(ids))) == []
            expected_filters = 2 if parallelism == 1 else 1
            for entry in restored._ids.generations.values():
                assert entry.own is None and len(entry.inherited) == expected_filters
            passed(restored, batch([10**9], [0]))
            again = restored.snapshot()  # inherited filters survive the next checkpoint too
            assert again.num_rows == 3 * expected_filters + 1


@pytest.mark.parametrize("mode", MODES)
def test_restore_with_another_generation_span_keeps_every_id_long_enough(mode: str) -> None:
    old = build(mode, within_ms=1_000, generations=2, expected_items=1_000)  # 1000 ms generations
    passed(old, batch([1, 2], [100, 1_900]))
    state = old.snapshot()
    new = build(mode, within_ms=3_000, generations=4, expected_items=1_000, resume_state=state)  # 1000 ms / 3
    new.on_watermark(2_000 + 2_998)  # id 2: its old generation ended at 2000; within_ms is now 3000
    assert new.on_batch(batch([2], [5_000])) == []
    new.on_watermark(2_000 + 2_999)
    assert passed(new, batch([1, 2], [5_001, 5_001])) == [1, 2]


def test_restore_rejects_foreign_or_mismatched_state() -> None:
    with pytest.raises(DataError, match="not dedupe state"):
        build("exact", resume_state=pa.table({"key_group": pa.array([], pa.int32())}))
    state = build("bloom").snapshot()
    with pytest.raises(DataError, match="mode 'bloom'.*restore with the mode"):
        build("exact", resume_state=state)
    exact = build("exact").snapshot()
    with pytest.raises(DataError, match="lacks column 'key'") as caught:
        build("exact", resume_state=exact.drop_columns(["key"]))
    assert caught.value.column == "key"


# --- errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_missing_columns_and_null_ids_raise_data_errors_naming_operator_and_column(mode: str) -> None:
    logic = build(mode)
    with pytest.raises(DataError, match=r"'dedupe_1'.*dedup column 'id' is missing.*dedupe on a column") as caught:
        logic.on_batch(pa.record_batch({"user": [1], "t": [0]}))
    assert (caught.value.operator, caught.value.column) == ("dedupe_1", "id")
    with pytest.raises(DataError, match=r"'dedupe_1'.*'t' is missing") as caught:
        logic.on_batch(pa.record_batch({"id": [1]}))
    assert caught.value.column == "t"
    with pytest.raises(DataError, match=r"'dedupe_1'.*'id' has 1 null values.*fill or filter") as caught:
        logic.on_batch(batch([1, None], [0, 0]))
    assert caught.value.column == "id"
    with pytest.raises(DataError, match=r"'id'"):
        logic.on_batch(pa.record_batch({"id": pa.array([[1]]), "t": [0]}))


def test_exact_mode_rejects_an_id_column_that_changes_type() -> None:
    logic = build("exact")
    passed(logic, batch([1], [0]))
    with pytest.raises(DataError, match=r"'id' changed type to string.*keep the id column's type stable"):
        logic.on_batch(batch(["1"], [0]))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"on": []}, "on must name"),
    ({"on": ["a", "a"]}, "repeats a column"),
    ({"within_ms": 0}, "within_ms must be an integer >= 1"),
    ({"within_ms": 1.5}, "within_ms"),
    ({"mode": "approx"}, "mode must be 'bloom' or 'exact'"),
    ({"fp_rate": 0.0}, "fp_rate must be a probability"),
    ({"fp_rate": 1}, "fp_rate"),
    ({"expected_items": 0}, "expected_items"),
    ({"generations": 1}, "generations must be an integer >= 2"),
    ({"time_column": ""}, "time_column"),
])
def test_bad_configs_raise_plan_errors(kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"on": "id", "within_ms": 1_000, "time_column": "t", **kwargs}
    on, within = arguments.pop("on"), arguments.pop("within_ms")
    with pytest.raises(PlanError, match=message):
        Dedupe(on, within, **arguments)


# --- the dataflow API ------------------------------------------------------------------------------------


def test_stream_dedupe_adds_a_keyed_node() -> None:
    flow = Dataflow("dedupe-plan")
    events = flow.source(TestingSource([{"id": 1, "t": 0}]), watermark=BoundedOutOfOrderness("t"))
    out = events.dedupe(["id"], within_ms=5_000, mode="exact", name="dd", parallelism=2)
    out.sink(TestingSink())
    node = flow.nodes[1]
    assert node.name == "dd" and node.keyed and node.parallelism == 2
    assert node.inputs[0].keys == ("id",) and node.inputs[0].key_by == "dd"
    spec = node.spec
    assert isinstance(spec, Dedupe)
    assert (spec.on, spec.within_ms, spec.time_column, spec.mode) == (("id",), 5_000, "t", "exact")
    assert out.time_column == "t"
    assert flow.nodes[2].inputs[0].node == node.id
    default = Dataflow("dedupe-default").source(TestingSource([{"id": 1, "t": 0}]),
                                                 watermark=BoundedOutOfOrderness("t")).dedupe("id", within_ms=10)
    assert default.node.name == "dedupe_1"


def test_stream_dedupe_without_event_time_is_a_plan_error() -> None:
    flow = Dataflow("dedupe-no-time")
    events = flow.source(TestingSource([{"id": 1}]))
    with pytest.raises(PlanError, match="no event time.*time_column="):
        events.dedupe("id", within_ms=1_000)
    assert events.dedupe("id", within_ms=1_000, time_column="t").node.spec.time_column == "t"
