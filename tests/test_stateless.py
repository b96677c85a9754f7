"""map, filter, flat_map and map_batches: exact outputs and clear errors."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from onceflow.errors import DataError, OperatorError
from onceflow.operators.logic import MAIN, OperatorContext
from onceflow.operators.stateless import Filter, FlatMap, Map, MapBatches

CTX = OperatorContext("op_1")
BATCH = pa.record_batch({"user": ["a", "b", "c"], "amount": [1.0, 2.5, 4.0]})


def rows(emitted: list[tuple[int, pa.RecordBatch]]) -> list[dict]:
    assert all(port == MAIN for port, _ in emitted)
    return [row for _, batch in emitted for row in batch.to_pylist()]


def test_map_applies_to_every_row() -> None:
    logic = Map(lambda r: {"user": r["user"].upper(), "double": r["amount"] * 2}).build(CTX)
    assert rows(logic.on_batch(BATCH)) == [
        {"user": "A", "double": 2.0}, {"user": "B", "double": 5.0}, {"user": "C", "double": 8.0}]


def test_map_output_must_keep_its_schema() -> None:
    logic = Map(lambda r: {"v": r["amount"]}).build(CTX)
    logic.on_batch(BATCH)
    bad = Map(lambda r: {"v": "text"})
    logic._out.schema = pa.schema([("v", pa.float64())])
    with pytest.raises(DataError, match="op_1.*does not fit the schema"):
        logic._fn = bad.fn
        logic.on_batch(BATCH)


def test_map_that_returns_a_non_dict_is_a_clear_error() -> None:
    with pytest.raises(DataError, match="op_1.*returned int, expected a dict"):
        Map(lambda r: 1).build(CTX).on_batch(BATCH)


def test_user_exception_names_the_operator() -> None:
    with pytest.raises(OperatorError, match="'op_1': the map function raised ZeroDivisionError"):
        Map(lambda r: {"x": 1 / 0}).build(CTX).on_batch(BATCH)


def test_filter_keeps_matching_rows_and_schema() -> None:
    out = Filter(lambda r: r["amount"] > 2).build(CTX).on_batch(BATCH)
    assert rows(out) == [{"user": "b", "amount": 2.5}, {"user": "c", "amount": 4.0}]
    assert out[0][1].schema == BATCH.schema
    assert Filter(lambda r: False).build(CTX).on_batch(BATCH) == []


def test_flat_map_expands_and_drops() -> None:
    logic = FlatMap(lambda r: [{"u": r["user"]}] * int(r["amount"] // 2)).build(CTX)
    assert rows(logic.on_batch(BATCH)) == [{"u": "b"}, {"u": "c"}, {"u": "c"}]


def test_map_batches_is_vectorised_and_checks_schema() -> None:
    logic = MapBatches(lambda b: b.append_column("cents", pc.multiply(b.column("amount"), 100))).build(CTX)
    assert rows(logic.on_batch(BATCH))[1] == {"user": "b", "amount": 2.5, "cents": 250.0}
    changing = MapBatches(lambda b: b.drop_columns(["amount"]) if b.num_rows == 1 else b).build(CTX)
    changing.on_batch(BATCH)
    with pytest.raises(DataError, match=r"operator 'op_1': map_batches returned schema .* column 'amount'") as info:
        changing.on_batch(BATCH.slice(0, 1))
    assert info.value.column == "amount"


def test_map_batches_declared_schema_is_enforced() -> None:
    logic = MapBatches(lambda b: b, schema=pa.schema([("user", pa.string())])).build(CTX)
    with pytest.raises(DataError, match="column 'amount'"):
        logic.on_batch(BATCH)


def test_map_batches_must_return_arrow() -> None:
    with pytest.raises(DataError, match="returned list, expected a pyarrow.RecordBatch"):
        MapBatches(lambda b: b.to_pylist()).build(CTX).on_batch(BATCH)
