"""ParquetSink: invisible until committed, idempotent commits, abort, rolling."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from onceflow.checkpoint.two_phase_commit import CommittableRecord, SinkContext
from onceflow.errors import DataError, PlanError, SinkCommitError
from onceflow.operators.sinks.parquet import ParquetSink

CTX = SinkContext(job="job", operator="sink_2", subtask=1, parallelism=2)


def batch(start: int, stop: int) -> pa.RecordBatch:
    return pa.record_batch({"id": pa.array(range(start, stop), pa.int64()),
                            "name": [f"n{i}" for i in range(start, stop)]})


def visible(directory: Path) -> list[int]:
    """The ids a reader of the directory sees (no files: no columns, no rows)."""
    table = ds.dataset(directory, format="parquet").to_table()
    return sorted(table.column("id").to_pylist()) if table.num_columns else []


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_rows_are_invisible_until_committed_then_exactly_visible(tmp_path: Path) -> None:
    out = tmp_path / "out"
    sink = ParquetSink(out)
    sink.prepare()
    writer = sink.create_writer(CTX)
    writer.write(batch(0, 5))
    writer.write(batch(5, 8))
    assert visible(out) == []
    assert [n.startswith(".") and n.endswith(".parquet.inprogress") for n in names(out)] == [True]
    committables = writer.prepare_commit()
    assert visible(out) == []
    assert len(committables) == 1
    (committable,) = committables
    stored = committable.to_record().to_dict()
    assert msgpack.unpackb(msgpack.packb(stored)) == stored
    assert stored["v"] == 1
    assert Path(committable.pending).name.startswith("_job-sink_2-1-")
    assert committable.pending.endswith("-0.parquet.pending")
    assert Path(committable.final).name == Path(committable.pending).name[1:-len(".pending")].replace(
        "job-", "part-job-", 1)
    assert Path(committable.final).parent == out
    sink.create_committer(CTX).commit(committables)
    assert visible(out) == list(range(8))
    assert all(n.startswith("part-job-sink_2-1-") for n in names(out))
    assert ds.dataset(out, format="parquet").to_table().schema == batch(0, 1).schema


def test_commit_twice_is_a_no_op(tmp_path: Path) -> None:
    sink = ParquetSink(tmp_path)
    writer = sink.create_writer(CTX)
    writer.write(batch(0, 3))
    committables = writer.prepare_commit()
    committer = sink.create_committer(CTX)
    committer.commit(committables)
    committer.commit(committables)
    sink.create_committer(CTX).commit(committables)  # a recovered committer, too
    assert visible(tmp_path) == [0, 1, 2]


def test_commit_of_a_vanished_file_raises_but_commits_the_rest(tmp_path: Path) -> None:
    sink = ParquetSink(tmp_path, rolling_bytes=1)
    writer = sink.create_writer(CTX)
    writer.write(batch(0, 2))
    writer.write(batch(2, 4))
    lost, kept = writer.prepare_commit()
    Path(lost.pending).unlink()
    with pytest.raises(SinkCommitError, match=r"parquet sink sink_2: cannot commit 1 file\(s\), neither the pending "
                                              r"file nor its part file exists .*rerun the job"):
        sink.create_committer(CTX).commit([lost, kept])
    assert visible(tmp_path) == [2, 3]


def test_an_unknown_committable_version_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SinkCommitError, match="committable version 2 is not supported"):
        ParquetSink(tmp_path).read_committable(CommittableRecord(2, {"pending": "x", "final": "y"}), operator="sink_2")


def test_writer_abort_leaves_no_file(tmp_path: Path) -> None:
    sink = ParquetSink(tmp_path, rolling_bytes=1_000)
    writer = sink.create_writer(CTX)
    writer.write(batch(0, 200))  # rolled into a pending file
    writer.write(batch(200, 201))  # still in progress
    assert len(names(tmp_path)) == 2
    writer.abort()
    assert names(tmp_path) == []
    writer.write(batch(300, 301))  # the writer can start again
    sink.create_committer(CTX).commit(writer.prepare_commit())
    assert visible(tmp_path) == [300]


def test_committer_abort_deletes_pending_files_only(tmp_path: Path) -> None:
    sink = ParquetSink(tmp_path)
    writer = sink.create_writer(CTX)
    writer.write(batch(0, 2))
    committed = writer.prepare_commit()
    sink.create_committer(CTX).commit(committed)
    writer.write(batch(2, 4))
    aborted = writer.prepare_commit()
    committer = sink.create_committer(CTX)
    committer.abort(aborted)
    committer.abort(aborted)  # idempotent
    committer.abort(committed)  # a committed file stays
    assert visible(tmp_path) == [0, 1]
    assert all(n.startswith("part-") for n in names(tmp_path))


def test_writer_abort_keeps_files_already_handed_out(tmp_path: Path) -> None:
    sink = ParquetSink(tmp_path)
    writer = sink.create_writer(CTX)
    writer.write(batch(0, 2))
    committables = writer.prepare_commit()
    writer.write(batch(2, 4))
    writer.abort()
    sink.create_committer(CTX).commit(committables)
    assert visible(tmp_path) == [0, 1]
    assert len(names(tmp_path)) == 1


def test_rolling_by_size_creates_several_files(tmp_path: Path) -> None:
    sink = ParquetSink(tmp_path, rolling_bytes=batch(0, 100).nbytes * 2)
    writer = sink.create_writer(CTX)
    for start in range(0, 500, 100):
        writer.write(batch(start, start + 100))
    assert sum(n.endswith(".pending") for n in names(tmp_path)) == 2  # rolled after batches 2 and 4
    committables = writer.prepare_commit()
    assert len(committables) == 3
    assert [c.final.rsplit("-", 1)[1] for c in committables] == ["0.parquet", "1.parquet", "2.parquet"]
    sink.create_committer(CTX).commit(committables)
    assert visible(tmp_path) == list(range(500))
    assert len(names(tmp_path)) == 3


def test_rolling_by_interval(tmp_path: Path) -> None:
    clock = FakeClock()
    sink = ParquetSink(tmp_path, rolling_interval_s=10.0, clock=clock)
    writer = sink.create_writer(CTX)
    writer.write(batch(0, 1))
    clock.now = 5.0
    writer.write(batch(1, 2))
    writer.flush(end_of_input=False)
    assert not any(n.endswith(".pending") for n in names(tmp_path))
    clock.now = 10.0
    writer.flush(end_of_input=False)  # rolls the file open for 10 s
    assert sum(n.endswith(".pending") for n in names(tmp_path)) == 1
    writer.write(batch(2, 3))
    clock.now = 25.0
    writer.write(batch(3, 4))  # rolls before writing
    committables = writer.prepare_commit()
    assert len(committables) == 3
    sink.create_committer(CTX).commit(committables)
    assert visible(tmp_path) == [0, 1, 2, 3]


def test_empty_batches_and_empty_transactions_commit_nothing(tmp_path: Path) -> None:
    sink = ParquetSink(tmp_path)
    writer = sink.create_writer(CTX)
    assert writer.prepare_commit() == []
    writer.write(batch(0, 0))
    assert writer.prepare_commit() == []
    assert names(tmp_path) == []


def test_subtasks_write_side_by_side(tmp_path: Path) -> None:
    sink = ParquetSink(str(tmp_path))
    committables = []
    for subtask in range(3):
        ctx = SinkContext(job="job", operator="sink_2", subtask=subtask, parallelism=3)
        writer = sink.create_writer(ctx)
        writer.write(batch(subtask * 10, subtask * 10 + 10))
        committables += writer.prepare_commit()
    sink.create_committer(CTX).commit(committables)
    assert visible(tmp_path) == list(range(30))
    assert [n.split("-")[3] for n in names(tmp_path)] == ["0", "1", "2"]


def test_a_batch_with_another_schema_names_the_operator_and_column(tmp_path: Path) -> None:
    writer = ParquetSink(tmp_path).create_writer(CTX)
    writer.write(batch(0, 1))
    other = pa.record_batch({"id": pa.array(["x"]), "name": ["y"]})
    with pytest.raises(DataError, match="parquet sink sink_2: a batch has column 'id' as string, not int64") as info:
        writer.write(other)
    assert (info.value.operator, info.value.column) == ("sink_2", "id")


def test_a_file_uri_and_nested_directories_work(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b"
    sink = ParquetSink(out.as_uri(), compression="zstd")
    sink.prepare()
    assert out.is_dir()
    writer = sink.create_writer(CTX)
    writer.write(batch(0, 2))
    sink.create_committer(CTX).commit(writer.prepare_commit())
    assert visible(out) == [0, 1]


def test_bad_options_are_plan_errors(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="rolling_bytes must be > 0"):
        ParquetSink(tmp_path, rolling_bytes=0)
    with pytest.raises(PlanError, match="rolling_interval_s must be > 0 or None"):
        ParquetSink(tmp_path, rolling_interval_s=0)


@pytest.mark.parametrize(("mine", "theirs"), [
    (SinkContext(job="job", operator="sink", subtask=1), SinkContext(job="job", operator="sink-1", subtask=0)),
    (SinkContext(job="a", operator="b-c", subtask=0), SinkContext(job="a-b", operator="c", subtask=0)),
    (SinkContext(job="job", operator="sink 2", subtask=0), SinkContext(job="job", operator="sink_2", subtask=0)),
    (SinkContext(job="job", operator="sink-2", subtask=0), SinkContext(job="job", operator="sink-2x", subtask=0)),
], ids=["operator-subtask", "job-operator", "escaped-alike", "prefix"])
def test_lingering_clean_up_leaves_another_operators_files_alone(
        tmp_path: Path, mine: SinkContext, theirs: SinkContext) -> None:
    sink = ParquetSink(tmp_path)
    writer = sink.create_writer(theirs)
    writer.write(batch(0, 2))
    pending = writer.prepare_commit(1)
    writer.write(batch(2, 3))  # in progress
    before = names(tmp_path)
    sink.create_committer(mine).abort_lingering(keep=[])
    assert names(tmp_path) == before
    sink.create_committer(theirs).commit(pending)
    assert visible(tmp_path) == [0, 1]


def test_abort_lingering_removes_every_subtask_run_and_attempt_of_the_operator_but_the_kept(tmp_path: Path) -> None:
    sink = ParquetSink(tmp_path)
    handed_out = {}
    for key, ctx in {"kept": SinkContext("job", "sink_2", subtask=0, run="r", attempt=1),
                     "other subtask": SinkContext("job", "sink_2", subtask=1, run="r", attempt=1),
                     "other attempt": SinkContext("job", "sink_2", subtask=0, run="r", attempt=0),
                     "other run": SinkContext("job", "sink_2", subtask=0, run="q")}.items():
        writer = sink.create_writer(ctx)
        writer.write(batch(len(handed_out), len(handed_out) + 1))
        handed_out[key] = writer.prepare_commit(3)
        writer.write(batch(100, 101))  # left in progress
    committed = sink.create_writer(SinkContext("job", "sink_2", subtask=2))
    committed.write(batch(50, 51))
    sink.create_committer(CTX).commit(committed.prepare_commit(2))
    committer = sink.create_committer(SinkContext("job", "sink_2", run="r", attempt=2))
    assert len(committer.lingering()) == 8
    committer.abort_lingering(keep=handed_out["kept"])
    committer.abort_lingering(keep=handed_out["kept"])  # idempotent
    assert committer.lingering() == [handed_out["kept"][0].pending]
    committer.commit(handed_out["kept"])
    assert visible(tmp_path) == [0, 50]
    assert committer.lingering() == []
    with pytest.raises(SinkCommitError, match="neither the pending file nor its part file exists"):
        committer.commit(handed_out["other run"])


def test_file_names_carry_run_and_attempt_as_escaped_fields(tmp_path: Path) -> None:
    sink = ParquetSink(tmp_path)
    long = SinkContext(job="feature-window" + "j" * 300, operator="to parquet/" + "o" * 300, subtask=3,
                       run="run-1", attempt=2)
    writer = sink.create_writer(long)
    writer.write(batch(0, 1))
    (committable,) = writer.prepare_commit(1)
    name = Path(committable.pending).name
    assert len(name.encode()) < 255
    assert name.startswith("_feature%2Dwindowjjj") and name.count("-") == 6
    assert name.split("-")[2:5] == ["3", "run%2D1", "2"]
    assert sink.create_committer(long).lingering() == [committable.pending]
    sink.create_committer(long).commit([committable])
    assert visible(tmp_path) == [0]
