"""TestingSource: grouping rows, EOF and ABORT markers, offsets."""

from __future__ import annotations

import pickle

import msgpack
import pyarrow as pa
import pytest

from onceflow.errors import OnceflowError, PlanError
from onceflow.operators.sources.base import RescaledOffsets, SourceContext
from onceflow.testing.source import TestingSource, TestingSourceAbort, TestingSourceReader

CTX = SourceContext("test_0")


def read_all(reader: TestingSourceReader) -> list[list[dict[str, object]]]:
    out = []
    while (batch := reader.read()) is not None:
        out.append(batch.to_pylist())
    return out


def test_consecutive_rows_are_grouped_up_to_batch_size() -> None:
    items = [{"x": 1}, {"x": 2}, {"x": 3}, pa.record_batch({"x": [10, 11]}), {"x": 4},
             pa.table({"x": [20]}), pa.record_batch({"x": pa.array([], pa.int64())}), {"x": 5}]
    reader = TestingSource(items, batch_size=2).build(CTX)
    assert read_all(reader) == [[{"x": 1}, {"x": 2}], [{"x": 3}], [{"x": 10}, {"x": 11}], [{"x": 4}], [{"x": 20}],
                                [{"x": 5}]]
    assert reader.offset() == {"index": 8, "aborted": []}


def test_default_batch_size_is_one_row() -> None:
    assert read_all(TestingSource([{"x": 1}, {"x": 2}]).build(CTX)) == [[{"x": 1}], [{"x": 2}]]


def test_schema_applies_to_row_batches() -> None:
    schema = pa.schema([("x", pa.int32()), ("y", pa.string())])
    batch = TestingSource([{"x": 1}], schema=schema).build(CTX).read()
    assert batch is not None and batch.schema == schema


def test_eof_ends_the_run_and_a_resumed_reader_continues_after_it() -> None:
    source = TestingSource([{"x": 1}, TestingSource.EOF(), {"x": 2}, {"x": 3}], batch_size=5)
    reader = source.build(CTX)
    assert read_all(reader) == [[{"x": 1}]]
    assert reader.read() is None  # the run stays ended
    offset = msgpack.unpackb(msgpack.packb(reader.offset()))
    assert offset == {"index": 2, "aborted": []}
    assert read_all(source.build(CTX, offset)) == [[{"x": 2}, {"x": 3}]]


def test_resume_from_a_mid_stream_offset_gives_the_remaining_rows() -> None:
    source = TestingSource([{"x": i} for i in range(7)], batch_size=3)
    reader = source.build(CTX)
    reader.read()
    assert reader.offset() == {"index": 3, "aborted": []}
    assert read_all(source.build(CTX, reader.offset())) == [[{"x": 3}, {"x": 4}, {"x": 5}], [{"x": 6}]]


def test_abort_raises_once_and_the_offset_records_it() -> None:
    source = TestingSource([{"x": 1}, {"x": 2}, TestingSource.ABORT(), {"x": 3}], batch_size=5)
    reader = source.build(CTX)
    before = reader.offset()
    assert reader.read() is not None
    with pytest.raises(TestingSourceAbort, match="testing source test_0: injected crash at ABORT") as info:
        reader.read()
    assert isinstance(info.value, OnceflowError)
    assert info.value.index == 2
    after = reader.offset()
    assert after == {"index": 3, "aborted": [2]}
    assert read_all(source.build(CTX, after)) == [[{"x": 3}]]
    assert read_all(reader) == [[{"x": 3}]]
    # A job restarted from a checkpoint taken before the crash does not crash again (fires once per marker).
    assert read_all(source.build(CTX, before)) == [[{"x": 1}, {"x": 2}], [{"x": 3}]]


def test_abort_fires_once_per_marker_even_in_a_pickled_copy() -> None:
    source = TestingSource([TestingSource.ABORT(), {"x": 1}])
    copy = pickle.loads(pickle.dumps(source))
    with pytest.raises(TestingSourceAbort):
        copy.build(CTX).read()
    assert read_all(source.build(CTX)) == [[{"x": 1}]]
    fresh = TestingSource([TestingSource.ABORT(), {"x": 1}])
    with pytest.raises(TestingSourceAbort):
        fresh.build(CTX).read()


def test_an_offset_that_records_the_abort_skips_it() -> None:
    source = TestingSource([TestingSource.ABORT(), {"x": 1}])
    assert read_all(source.build(CTX, {"index": 0, "aborted": [0]})) == [[{"x": 1}]]


def test_only_subtask_0_reads() -> None:
    source = TestingSource([{"x": 1}])
    assert source.max_parallelism() == 1
    assert source.build(SourceContext("test_0", 1, 2)).read() is None
    assert read_all(source.build(SourceContext("test_0", 0, 2))) == [[{"x": 1}]]


def test_empty_items_end_at_once() -> None:
    assert TestingSource([]).build(CTX).read() is None


def test_bad_items_and_offsets_are_plan_errors() -> None:
    with pytest.raises(PlanError, match="testing source: item 1 is a int; pass dict rows"):
        TestingSource([{"x": 1}, 5])  # type: ignore[list-item]
    with pytest.raises(PlanError, match="batch_size must be > 0"):
        TestingSource([], batch_size=0)
    with pytest.raises(PlanError, match=r"test_0: resume offset .* is not \{'index': i"):
        TestingSource([]).build(CTX, {"next_batch": 1})


def test_not_collected_as_a_test_class() -> None:
    assert TestingSource.__test__ is False


def test_rescaled_offsets_resume_subtask_0_where_the_old_subtask_0_was() -> None:
    source = TestingSource([{"x": 1}, {"x": 2}, {"x": 3}])
    reader = source.build(CTX)
    reader.read()
    rescaled = RescaledOffsets((msgpack.unpackb(msgpack.packb(reader.offset())),))
    assert read_all(source.build(CTX, rescaled)) == [[{"x": 2}], [{"x": 3}]]
    assert read_all(source.build(SourceContext("test_0", 1, 2), rescaled)) == []
