"""Typed, versioned committables: stored in today's layout, read back typed, every version written stays readable."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import msgpack
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from onceflow.checkpoint.state import read_sink_state, sink_state
from onceflow.checkpoint.two_phase_commit import Committable, CommittableRecord, SinkContext, TransactionalSink
from onceflow.errors import CheckpointError, SinkCommitError
from onceflow.operators.sinks.parquet import ParquetCommittable, ParquetSink
from onceflow.operators.sinks.postgres import PostgresSink, PreparedTransaction, StagedTransaction
from onceflow.testing.sink import TestingCommittable, TestingSink

CTX = SinkContext(job="job", operator="sink_1")


def _restored(sink: TransactionalSink[Any], stored: dict[str, Any]) -> Any:
    """A committable stored (by an earlier onceflow) in its dict form, read back through a checkpoint table."""
    table = pa.table(
        [pa.array([4], pa.int64()), pa.array([msgpack.packb(stored)], pa.binary())],
        schema=sink_state({}).schema,
    )
    ((checkpoint_id, (record,)),) = read_sink_state(table).items()
    assert checkpoint_id == 4
    return sink.read_committable(record, operator="sink_1")


TODAY = [
    (
        ParquetCommittable("/o/_a.parquet.pending", "/o/part-a.parquet"),
        {"v": 1, "pending": "/o/_a.parquet.pending", "final": "/o/part-a.parquet"},
    ),
    (TestingCommittable("sink_1/0/abc-0", b"\x00\x01"), {"v": 1, "id": "sink_1/0/abc-0", "batches": b"\x00\x01"}),
    (PreparedTransaction("onceflow:job:sink_1:0:7::0"), {"v": 1, "gid": "onceflow:job:sink_1:0:7::0"}),
    (
        StagedTransaction(
            "onceflow:job:sink_1:0:w1.0::0", "public.onceflow_stage_t_1", "public.t", ("id", "x"), ("id",), 7
        ),
        {
            "v": 2,
            "txn": "onceflow:job:sink_1:0:w1.0::0",
            "checkpoint": 7,
            "table": "public.t",
            "staging": "public.onceflow_stage_t_1",
            "columns": ["id", "x"],
            "keys": ["id"],
        },
    ),
]
SINKS = {
    ParquetCommittable: lambda: ParquetSink("/o"),
    TestingCommittable: TestingSink,
    PreparedTransaction: lambda: PostgresSink("host=127.0.0.1", "t"),
    StagedTransaction: lambda: PostgresSink("host=127.0.0.1", "t", mode="upsert", key_columns=["id"]),
}


@pytest.mark.parametrize(("committable", "stored"), TODAY, ids=lambda v: type(v).__name__)
def test_a_committable_is_stored_byte_for_byte_in_the_dict_form_of_its_version(
    committable: Committable, stored: dict[str, Any]
) -> None:
    assert committable.to_record().to_dict() == stored
    assert list(committable.to_record().to_dict()) == list(stored)  # same keys in the same order
    assert sink_state({4: [committable]}).equals(sink_state({4: [stored]}))


@pytest.mark.parametrize(("committable", "stored"), TODAY, ids=lambda v: type(v).__name__)
def test_a_committable_in_todays_dict_form_restores_typed(committable: Committable, stored: dict[str, Any]) -> None:
    restored = _restored(SINKS[type(committable)](), stored)
    assert type(restored) is type(committable)
    assert restored == committable
    assert pickle.loads(pickle.dumps(restored)) == restored  # travels to the committer through Ray


def test_a_restored_parquet_committable_commits(tmp_path: Path) -> None:
    sink = ParquetSink(tmp_path)
    writer = sink.create_writer(CTX)
    writer.write(pa.record_batch({"x": [1, 2]}))
    (written,) = writer.prepare_commit()
    stored = {"v": 1, "pending": written.pending, "final": written.final}  # as a checkpoint of today holds it
    sink.create_committer(CTX).commit([_restored(sink, stored)])
    assert ds.dataset(tmp_path, format="parquet").to_table().to_pydict() == {"x": [1, 2]}


@pytest.mark.parametrize(
    ("sink", "version"),
    [(ParquetSink("/o"), 2), (TestingSink(), 2), (PostgresSink("host=127.0.0.1", "t"), 3)],
    ids=["parquet", "testing", "postgres"],
)
def test_an_unknown_version_is_refused_naming_the_operator(sink: TransactionalSink[Any], version: int) -> None:
    with pytest.raises(
        SinkCommitError,
        match=rf"sink sink_1: committable version {version} is not supported "
        r"\(this onceflow reads versions .*\); resolve the checkpoint",
    ):
        _restored(sink, {"v": version, "id": "x"})


def test_a_staged_committable_naming_a_table_that_is_no_identifier_is_refused() -> None:
    stored = dict(TODAY[3][1], staging="t; DROP TABLE t")
    with pytest.raises(SinkCommitError, match="the checkpoint is damaged"):
        _restored(PostgresSink("host=127.0.0.1", "t", mode="upsert", key_columns=["id"]), stored)


def test_a_stored_committable_without_a_version_is_a_checkpoint_error() -> None:
    with pytest.raises(CheckpointError, match="has no version"):
        read_sink_state(sink_state({1: [{"id": "a"}]}))


def test_a_sink_with_mapping_committables_gets_its_mappings_back() -> None:
    class MappingSink(TransactionalSink[dict[str, Any]]):
        def create_writer(self, ctx: SinkContext) -> Any:
            raise NotImplementedError

        def create_committer(self, ctx: SinkContext) -> Any:
            raise NotImplementedError

    (record,) = read_sink_state(sink_state({2: [{"v": 3, "txn": "a"}]}))[2]
    assert record == CommittableRecord(3, {"txn": "a"})
    assert MappingSink().read_committable(record) == {"v": 3, "txn": "a"}


def test_committables_are_frozen() -> None:
    committable = ParquetCommittable("a", "b")
    with pytest.raises(AttributeError):
        committable.pending = "c"  # type: ignore[misc]
