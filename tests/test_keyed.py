"""Keyed process and reduce: per-key state, exact outputs, snapshot and restore."""

from __future__ import annotations

import pyarrow as pa
import pytest

from checkpoint.errors import DataError
from operators.keyed import KeyedProcess, KeyedReduce
from operators.keygroups import key_group_range, key_groups_of
from operators.logic import OperatorContext

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
