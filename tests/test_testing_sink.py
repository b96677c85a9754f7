"""TestingSink: committed rows reach the driver through a Ray store actor, once per id."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterator

import msgpack
import pyarrow as pa
import pytest
import ray

from onceflow.checkpoint.two_phase_commit import SinkContext
from onceflow.errors import OnceflowError, SinkCommitError
from onceflow.testing.sink import TestingSink

CTX = SinkContext(job="job", operator="sink_3", subtask=0)


def rows(start: int, stop: int) -> pa.RecordBatch:
    return pa.record_batch({"x": pa.array(range(start, stop), pa.int64())})


# -- without Ray (these run before the module's Ray fixture starts) ---------------------------------------


def test_without_ray_the_store_lives_in_process_and_cannot_travel() -> None:
    if ray.is_initialized():
        pytest.skip("Ray already runs in this session")
    sink = TestingSink()
    sink.prepare()
    writer = sink.create_writer(CTX)
    writer.write(rows(0, 2))
    sink.create_committer(CTX).commit(writer.prepare_commit())
    assert sink.rows() == [{"x": 0}, {"x": 1}]
    with pytest.raises(OnceflowError, match=r"testing sink: the sink was prepared without Ray.*call ray\.init"):
        pickle.dumps(sink)


def test_commit_before_prepare_is_an_error() -> None:
    sink = TestingSink()
    writer = sink.create_writer(CTX)
    writer.write(rows(0, 1))
    with pytest.raises(SinkCommitError, match=r"testing sink sink_3: the sink has no store; call "
                                              r"TestingSink.prepare\(\)"):
        sink.create_committer(CTX).commit(writer.prepare_commit())
    assert sink.rows() == []


# -- with Ray -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_store() -> Iterator[None]:
    """Ray for the store actor: the session's if one runs, else a small one for this module."""
    if ray.is_initialized():
        yield
        return
    ray.init(num_cpus=1, include_dashboard=False, namespace="onceflow-test", logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture
def sink(ray_store: None) -> TestingSink:
    sink = TestingSink()
    sink.prepare()
    return sink


def test_nothing_is_visible_before_commit(sink: TestingSink) -> None:
    writer = sink.create_writer(CTX)
    writer.write(rows(0, 3))
    committables = writer.prepare_commit()
    assert sink.rows() == []
    assert sink.committed_ids() == []
    empty = sink.table()
    assert (empty.num_rows, empty.num_columns) == (0, 0)
    assert len(committables) == 1
    stored = committables[0].to_record().to_dict()
    assert msgpack.unpackb(msgpack.packb(stored)) == stored
    assert stored["v"] == 1
    assert committables[0].id.startswith("sink_3/0/")


def test_committed_rows_in_commit_order_and_commit_is_idempotent(sink: TestingSink) -> None:
    first = sink.create_writer(CTX)
    second = sink.create_writer(SinkContext(job="job", operator="sink_3", subtask=1, parallelism=2))
    first.write(rows(0, 2))
    first.write(rows(2, 3))
    second.write(rows(10, 12))
    a = first.prepare_commit()
    b = second.prepare_commit()
    first.write(rows(3, 4))
    c = first.prepare_commit()
    committer = sink.create_committer(CTX)
    committer.commit(b)
    committer.commit(a + c)
    committer.commit(a)  # a recommit after recovery is a no-op
    sink.create_committer(CTX).commit(b + c)
    assert sink.table().column("x").to_pylist() == [10, 11, 0, 1, 2, 3]
    assert sink.rows() == [{"x": x} for x in [10, 11, 0, 1, 2, 3]]
    ids = sink.committed_ids()
    assert ids == [b[0].id, a[0].id, c[0].id]
    assert [i.rsplit("/", 1)[0] for i in ids] == ["sink_3/1", "sink_3/0", "sink_3/0"]
    assert len(set(ids)) == 3


def test_a_restarted_writer_does_not_collide_with_committed_ids(sink: TestingSink) -> None:
    before = sink.create_writer(CTX)
    before.write(rows(0, 1))
    sink.create_committer(CTX).commit(before.prepare_commit())
    after = sink.create_writer(CTX)  # the same subtask after a failure
    after.write(rows(1, 2))
    sink.create_committer(CTX).commit(after.prepare_commit())
    assert sink.rows() == [{"x": 0}, {"x": 1}]


def test_abort_discards(sink: TestingSink) -> None:
    writer = sink.create_writer(CTX)
    writer.write(rows(0, 2))
    writer.abort()
    assert writer.prepare_commit() == []
    writer.write(rows(5, 6))
    committables = writer.prepare_commit()
    sink.create_committer(CTX).abort(committables)
    assert sink.rows() == []
    writer.write(pa.record_batch({"x": pa.array([], pa.int64())}))
    assert writer.prepare_commit() == []


def test_prepare_again_keeps_the_store(sink: TestingSink) -> None:
    writer = sink.create_writer(CTX)
    writer.write(rows(0, 1))
    sink.create_committer(CTX).commit(writer.prepare_commit())
    sink.prepare()  # a second run of the same flow adds to the rows of the first
    writer = sink.create_writer(CTX)
    writer.write(rows(1, 2))
    sink.create_committer(CTX).commit(writer.prepare_commit())
    assert sink.rows() == [{"x": 0}, {"x": 1}]


def test_a_worker_process_commits_what_the_driver_reads(sink: TestingSink) -> None:
    @ray.remote(num_cpus=0)
    def write_and_commit(sink: TestingSink) -> int:
        ctx = SinkContext(job="job", operator="sink_3", subtask=2, parallelism=3)
        writer = sink.create_writer(ctx)
        writer.write(pa.record_batch({"x": pa.array([7, 8], pa.int64())}))  # no helpers: tests/ is not importable
        sink.create_committer(ctx).commit(writer.prepare_commit())
        return writer.rows_written

    assert ray.get(write_and_commit.remote(sink)) == 2
    assert sink.rows() == [{"x": 7}, {"x": 8}]
    assert sink.committed_ids()[0].startswith("sink_3/2/")


def test_abort_lingering_aborts_every_pre_commit_of_the_operator_but_the_kept(sink: TestingSink) -> None:
    committables = {}
    for key, ctx in {"kept": SinkContext("job", "sink_3", subtask=0, run="r", attempt=1),
                     "other subtask": SinkContext("job", "sink_3", subtask=1, run="r", attempt=1),
                     "other attempt": SinkContext("job", "sink_3", subtask=0, run="r", attempt=0),
                     "other run": SinkContext("job", "sink_3", subtask=0, run="q"),
                     "other operator": SinkContext("job", "sink_30"),
                     "other job": SinkContext("job-x", "sink_3")}.items():
        writer = sink.create_writer(ctx)
        writer.write(rows(len(committables), len(committables) + 1))
        committables[key] = writer.prepare_commit(4)
    committer = sink.create_committer(SinkContext("job", "sink_3", run="r", attempt=2))
    assert len(committer.lingering()) == 4
    assert len(sink.pending_ids()) == 6
    committer.abort_lingering(keep=committables["kept"])
    committer.abort_lingering(keep=committables["kept"])  # idempotent
    assert committer.lingering() == [committables["kept"][0].id]
    with pytest.raises(SinkCommitError, match=r"testing sink sink_3: cannot commit 1 transaction\(s\) that were "
                                              r"aborted .*a checkpoint named a transaction that recovery aborted"):
        committer.commit(committables["kept"] + committables["other attempt"])
    committer.commit(committables["other operator"] + committables["other job"])
    assert sink.rows() == [{"x": 0}, {"x": 4}, {"x": 5}]
    assert sink.pending_ids() == []
    committer.abort(committables["kept"])  # a committed id stays committed
    assert sink.rows() == [{"x": 0}, {"x": 4}, {"x": 5}]
