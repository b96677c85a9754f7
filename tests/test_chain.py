"""The operator chain (no Ray): routing between fused operators, outputs, counts, snapshots, blame."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from onceflow.errors import DataError, OperatorError
from onceflow.operators.logic import MAIN, Emitted, OperatorLogic
from onceflow.runtime.chain import INTO_SINK, OperatorChain

LATE = 1


class _Split(OperatorLogic):
    """Even values go to the main port, odd ones to port 1; remembers the last watermark."""

    def __init__(self) -> None:
        self.watermark = 0

    def on_batch(self, batch: pa.RecordBatch) -> Emitted:
        odd = pc.equal(pc.bit_wise_and(batch["x"], 1), 1)
        return [(MAIN, batch.filter(pc.invert(odd))), (LATE, batch.filter(odd))]

    def on_watermark(self, watermark: int) -> Emitted:
        self.watermark = watermark
        return [(MAIN, pa.record_batch({"x": [watermark * 2]}))]

    def snapshot(self) -> pa.Table:
        return pa.table({"watermark": [self.watermark]})


class _Fails(OperatorLogic):
    def __init__(self, error: Exception) -> None:
        self.error = error

    def on_batch(self, batch: pa.RecordBatch) -> Emitted:
        raise self.error


def _values(batch: pa.RecordBatch) -> list[int]:
    return batch.column("x").to_pylist()


def test_main_output_feeds_the_next_node_and_wired_ports_leave_the_chain() -> None:
    chain = OperatorChain(["split", "sink"], {0: _Split()}, wired={(0, LATE)}, sink=1)
    outputs = chain.on_input(pa.record_batch({"x": [1, 2, 3, 4]}))
    assert [(o.stage, o.port, _values(o.batch)) for o in outputs] == [(1, INTO_SINK, [2, 4]), (0, LATE, [1, 3])]
    assert chain.records_in == [4, 2] and chain.records_out == [4, 0]


def test_a_source_chain_routes_the_rows_read_and_watermarks_flow_upstream_first() -> None:
    split = _Split()
    chain = OperatorChain(["source", "split"], {1: split}, wired={(1, MAIN)})
    outputs = chain.on_source_rows(pa.record_batch({"x": [2, 5]}))
    assert [(o.stage, o.port, _values(o.batch)) for o in outputs] == [(1, MAIN, [2])]  # port 1 is not wired
    outputs = chain.on_watermark(21)
    assert [(o.stage, _values(o.batch)) for o in outputs] == [(1, [42])]
    assert chain.snapshot(["uid-source", "uid-split"])["uid-split"].to_pylist() == [{"watermark": 21}]
    assert chain.metrics()["source"] == {"records_in": 0, "records_out": 2}
    assert chain.metrics()["split"] == {"records_in": 2, "records_out": 3}


def test_an_operator_failure_names_the_operator_and_subtask_and_keeps_the_cause() -> None:
    chain = OperatorChain(["parse", "sink"], {0: _Fails(ValueError("not a number: 'x'"))}, wired=set(), sink=1,
                          subtask=3)
    with pytest.raises(OperatorError, match=r"operator 'parse' \(subtask 3\) failed: ValueError: not a number") as info:
        chain.on_input(pa.record_batch({"x": [1]}))
    assert info.value.operator == "parse" and isinstance(info.value.__cause__, ValueError)


def test_an_onceflow_error_passes_through_unwrapped() -> None:
    error = DataError("column 'x' is missing", operator="parse")
    chain = OperatorChain(["parse"], {0: _Fails(error)}, wired=set())
    with pytest.raises(DataError) as info:
        chain.on_input(pa.record_batch({"x": [1]}))
    assert info.value is error
