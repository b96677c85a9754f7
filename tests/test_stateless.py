"""map, filter, flat_map and map_batches: exact outputs and clear errors."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from onceflow.errors import DataError, OperatorError, PlanError
from onceflow.operators.logic import DEAD_LETTERS, MAIN, OperatorContext
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


def parse_amounts(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Cast the text column ``amount`` to int64: raises on any value that is not a number."""
    return pa.record_batch({"id": batch.column("id"), "amount": pc.cast(batch.column("amount"), pa.int64())})


def test_map_batches_sends_the_rows_its_function_fails_on_to_dead_letters() -> None:
    logic = MapBatches(parse_amounts, errors="dead_letter").build(OperatorContext("parse", 0, 1))
    batch = pa.record_batch({"id": list(range(10)), "amount": ["1", "2", "x", "4", "5", "6", "7", "?", "9", "10"]})
    emitted = logic.on_batch(batch)
    main = pa.Table.from_batches([b for port, b in emitted if port == MAIN])
    dead = pa.Table.from_batches([b for port, b in emitted if port == DEAD_LETTERS])
    assert main.column("id").to_pylist() == [0, 1, 3, 4, 5, 6, 8, 9]  # in order, the bad rows taken out
    assert main.column("amount").to_pylist() == [1, 2, 4, 5, 6, 7, 9, 10]
    assert dead.column("id").to_pylist() == [2, 7] and dead.column("amount").to_pylist() == ["x", "?"]
    assert all("ArrowInvalid" in reason and "'x'" in dead.column("error")[0].as_py()
               for reason in dead.column("error").to_pylist())
    clean = logic.on_batch(pa.record_batch({"id": [20], "amount": ["20"]}))
    assert [port for port, _ in clean] == [MAIN]


def test_map_batches_without_dead_letters_still_fails_and_bad_options_are_plan_errors() -> None:
    logic = MapBatches(parse_amounts).build(OperatorContext("parse", 0, 1))
    with pytest.raises(OperatorError, match="operator 'parse': the map_batches function raised ArrowInvalid"):
        logic.on_batch(pa.record_batch({"id": [1], "amount": ["x"]}))
    with pytest.raises(PlanError, match="errors must be 'fail' or 'dead_letter'"):
        MapBatches(parse_amounts, errors="skip")


def test_a_job_routes_map_batches_dead_letters_to_their_own_sink() -> None:
    import onceflow as of

    def rows(offset: int, n: int) -> pa.RecordBatch:
        ids = list(range(offset, offset + n))
        return pa.record_batch({"id": ids, "amount": [str(i) if i % 7 else f"bad{i}" for i in ids]})

    flow = of.Dataflow("map-batches-dead-letters")
    parsed = flow.source(of.sources.GeneratorSource(rows, total=100, batch_size=16)).map_batches(
        parse_amounts, errors="dead_letter", name="parse")
    good, bad = of.sinks.TestingSink(), of.sinks.TestingSink()
    parsed.sink(good, name="good")
    parsed.dead_letters(name="unparsed").sink(bad, name="bad")
    other = of.Dataflow("map-batches-without-dead-letters")
    with pytest.raises(PlanError, match=r"step 'good_rows' \(MapBatches\) emits no dead letters"):
        other.source(of.sources.GeneratorSource(rows, total=1)).map_batches(parse_amounts, name="good_rows") \
            .dead_letters()
    result = of.run(flow, executor="local", parallelism=2)
    assert result.metrics["dead_letters"] == 15 and result.metrics["operators"]["parse"]["dead_letters"] == 15
    assert sorted(r["id"] for r in good.rows()) == [i for i in range(100) if i % 7]
    assert sorted(r["id"] for r in bad.rows()) == [i for i in range(100) if i % 7 == 0]
    assert all(r["error"] for r in bad.rows())
