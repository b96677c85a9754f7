"""Keyed process and reduce: per-key state, exact outputs, snapshot and restore."""

from __future__ import annotations

import pyarrow as pa
import pytest

from onceflow.errors import DataError
from onceflow.operators.keyed import KeyedProcess, KeyedReduce
from onceflow.operators.keygroups import key_group_range, key_groups_of
from onceflow.operators.logic import OperatorContext

CTX = OperatorContext("process_1")
EVENTS = pa.record_batch({"user": ["a", "b", "a", "a", "b"], "amount": [1, 2, 3, 4, 5]})


def running_total(state, row):
    total = (state or 0) + row["amount"]
    return total, {"user": row["user"], "total": total}


def out_rows(emitted):
    return [row for _, batch in emitted for row in batch.to_pylist()]


def test_process_keeps_state_per_key() -> None:
    logic = KeyedProcess(running_total, ["user"]).build(CTX)
    assert [r["total"] for r in out_rows(logic.on_batch(EVENTS))] == [1, 2, 4, 8, 7]
    assert [r["total"] for r in out_rows(logic.on_batch(EVENTS.slice(0, 1)))] == [9]


def test_process_state_none_forgets_the_key_and_outputs_may_be_lists() -> None:
    def every_second(state, row):
        if state is None:
            return 1, None
        return None, [{"user": row["user"], "pair": True}, {"user": row["user"], "pair": False}]

    logic = KeyedProcess(every_second, ["user"]).build(CTX)
    assert out_rows(logic.on_batch(EVENTS)) == [
        {"user": "a", "pair": True}, {"user": "a", "pair": False},
        {"user": "b", "pair": True}, {"user": "b", "pair": False}]
    assert logic.metrics() == {"keys": 1}  # "a" came a third time


def test_reduce_emits_every_update() -> None:
    logic = KeyedReduce(lambda acc, row: {**acc, "amount": acc["amount"] + row["amount"]}, ["user"]).build(CTX)
    assert [r["amount"] for r in out_rows(logic.on_batch(EVENTS))] == [1, 2, 4, 8, 7]


def test_missing_key_column_is_a_clear_error() -> None:
    with pytest.raises(DataError, match="operator 'process_1': key column 'account' is missing"):
        KeyedProcess(running_total, ["account"]).build(CTX).on_batch(EVENTS)


def test_snapshot_restores_only_owned_key_groups() -> None:
    logic = KeyedProcess(running_total, ["user"]).build(CTX)
    logic.on_batch(EVENTS)
    snapshot = logic.snapshot()
    assert snapshot is not None
    assert snapshot.column_names == ["key_group", "user", "state"]
    more = EVENTS.slice(0, 2)  # a +1, b +2
    groups = key_groups_of(more, ["user"], 128)
    restored = []
    for subtask in range(2):
        owned = key_group_range(subtask, 2, 128)
        ctx = OperatorContext("process_1", subtask, 2, 128, owned)
        part = KeyedProcess(running_total, ["user"]).build(ctx, resume_state=snapshot)
        mine = more.filter(pa.array([int(g) in owned for g in groups]))
        restored += out_rows(part.on_batch(mine)) if mine.num_rows else []
    assert sorted((r["user"], r["total"]) for r in restored) == [("a", 9), ("b", 9)]


def test_restore_from_several_old_subtasks_keeps_own_key_groups_and_key_types() -> None:
    events = pa.record_batch({"user": pa.array(["a", "b", "c", "d", "e", "f"], pa.large_string()),
                              "amount": [1, 2, 3, 4, 5, 6]})
    groups = key_groups_of(events, ["user"], 128)
    old = []
    for subtask in range(3):
        owned = key_group_range(subtask, 3, 128)
        logic = KeyedProcess(running_total, ["user"]).build(OperatorContext("process_1", subtask, 3, 128, owned))
        mine = events.filter(pa.array([int(g) in owned for g in groups]))
        if mine.num_rows:
            logic.on_batch(mine)
        if (snapshot := logic.snapshot()) is not None:
            old.append(snapshot)
    totals = {}
    for subtask in range(2):
        ctx = OperatorContext("process_1", subtask, 2, 128, key_group_range(subtask, 2, 128))
        for state in (old, pa.concat_tables(old)):  # a list, or the tables concatenated
            snapshot = KeyedProcess(running_total, ["user"]).build(ctx, resume_state=state).snapshot()
            assert snapshot is not None and snapshot.schema.field("user").type == pa.large_string()
            assert all(g in ctx.key_groups for g in snapshot.column("key_group").to_pylist())
            totals[subtask] = sorted(zip(snapshot.column("user").to_pylist(),
                                         snapshot.column("key_group").to_pylist(), strict=True))
    assert sorted(totals[0] + totals[1]) == sorted(zip("abcdef", groups.tolist(), strict=True))


def test_a_key_column_typed_null_in_one_batch_takes_the_type_of_the_next() -> None:
    logic = KeyedProcess(lambda total, row: ((total or 0) + row["amount"], None), ["user"]).build(CTX)
    logic.on_batch(pa.record_batch({"user": pa.array([None], pa.null()), "amount": [1]}))
    logic.on_batch(pa.record_batch({"user": pa.array([None, 7], pa.int64()), "amount": [2, 3]}))
    snapshot = logic.snapshot()
    assert snapshot is not None and snapshot.schema.field("user").type == pa.int64()
    assert sorted(snapshot.column("user").to_pylist(), key=str) == [7, None]
    with pytest.raises(DataError, match="key column 'user' changed type from int64 to string"):
        logic.on_batch(pa.record_batch({"user": ["x"], "amount": [1]}))


def test_restore_refuses_state_of_another_kind() -> None:
    other = pa.table({"key_group": pa.array([0], pa.int32())}).replace_schema_metadata(
        {"onceflow.state": "window_aggregate"})
    with pytest.raises(DataError, match="resume_state is window_aggregate state, not keyed state"):
        KeyedProcess(running_total, ["user"]).build(CTX, resume_state=other)
    with pytest.raises(DataError, match="resume_state lacks column 'state'"):
        KeyedProcess(running_total, ["user"]).build(CTX, resume_state=pa.table(
            {"key_group": pa.array([0], pa.int32()), "user": ["a"]}))
