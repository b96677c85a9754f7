"""The sink committer (no Ray): writes, pre-commits on barriers, commits in checkpoint order, aborts."""

from __future__ import annotations

import concurrent.futures
import threading
from dataclasses import dataclass, field

import pyarrow as pa
import pytest

from onceflow.checkpoint.state import read_sink_state
from onceflow.checkpoint.two_phase_commit import Committable, Committer, SinkContext, SinkWriter, TransactionalSink
from onceflow.runtime.sink_committer import SinkCommitter
from tests.helpers import wait_until


class _BlockingWriter(SinkWriter):
    """Records calls; ``write`` blocks until ``release`` is set."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.writing = threading.Event()
        self.release = threading.Event()

    def write(self, batch: pa.RecordBatch) -> None:
        self.writing.set()
        self.release.wait(timeout=30)
        self.calls.append(f"write {batch.num_rows}")

    def prepare_commit(self, checkpoint_id: int | None = None) -> list[Committable]:
        return []

    def abort(self) -> None:
        self.calls.append("abort")


class _ListWriter(SinkWriter):
    """Pre-commits the rows written since the last pre-commit as one committable."""

    def __init__(self) -> None:
        self.open: list[int] = []

    def write(self, batch: pa.RecordBatch) -> None:
        self.open.extend(batch.column("x").to_pylist())

    def prepare_commit(self, checkpoint_id: int | None = None) -> list[Committable]:
        rows, self.open = self.open, []
        return [{"v": 1, "checkpoint": checkpoint_id, "rows": rows}] if rows else []

    def abort(self) -> None:
        self.open = []


@dataclass
class _Published(Committer):
    """Publishes committables into ``log``; ``fail`` makes the next commit raise once."""

    log: list[Committable]
    fail: list[bool] = field(default_factory=list)

    def commit(self, committables: list[Committable]) -> None:
        if self.fail:
            self.fail.pop()
            raise ConnectionError("the database went away")
        self.log.extend(c for c in committables if c not in self.log)

    def abort(self, committables: list[Committable]) -> None:
        self.log.append({"aborted": committables})


class _Sink(TransactionalSink):
    def __init__(self, writer: SinkWriter) -> None:
        self.writer = writer
        self.published: list[Committable] = []
        self.fail: list[bool] = []

    def create_writer(self, ctx: SinkContext) -> SinkWriter:
        return self.writer

    def create_committer(self, ctx: SinkContext) -> Committer:
        return _Published(self.published, self.fail)


def _batch(*values: int) -> pa.RecordBatch:
    return pa.record_batch({"x": list(values)})


def test_commits_go_in_checkpoint_order_and_a_later_checkpoint_covers_a_lost_notification() -> None:
    sink = _Sink(_ListWriter())
    committer = SinkCommitter(sink, SinkContext("job", "sink"))
    for checkpoint_id, values in ((1, (1, 2)), (2, (3,)), (3, (4,))):
        committer.write(_batch(*values))
        state = committer.pre_commit(checkpoint_id)
    assert sorted(read_sink_state(state)) == [1, 2, 3]  # the snapshot holds every pre-committed transaction
    assert committer.commit_through(2) == 2  # notification 1 was lost: 2 commits 1 and 2, oldest first
    assert [c["checkpoint"] for c in sink.published] == [1, 2]
    assert list(committer.uncommitted) == [3]
    assert not committer.has_uncommitted(2) and committer.has_uncommitted(3)
    assert committer.rows == 4


def test_a_failed_commit_keeps_its_transactions_for_the_next_notification() -> None:
    sink = _Sink(_ListWriter())
    committer = SinkCommitter(sink, SinkContext("job", "sink"))
    committer.write(_batch(1))
    committer.pre_commit(1)
    sink.fail.append(True)
    with pytest.raises(ConnectionError):
        committer.commit_through(1)
    assert list(committer.uncommitted) == [1]
    committer.write(_batch(2))
    committer.pre_commit(2)
    assert committer.commit_through(2) == 2
    assert [c["rows"] for c in sink.published] == [[1], [2]]


def test_without_checkpoints_the_end_of_input_pre_commits_once_and_an_abort_discards_it() -> None:
    sink = _Sink(_ListWriter())
    committer = SinkCommitter(sink, SinkContext("job", "sink"))
    committer.write(_batch(1, 2))
    committer.end_of_input()
    assert [c["rows"] for c in committer.final] == [[1, 2]] and not committer.uncommitted
    committer.abort(wait_s=1, discard_final=True)
    assert sink.published == [{"aborted": committer.final}]


def test_with_checkpoints_an_abort_leaves_pre_committed_transactions_for_recovery() -> None:
    sink = _Sink(_ListWriter())
    committer = SinkCommitter(sink, SinkContext("job", "sink"))
    committer.write(_batch(1))
    committer.pre_commit(1)
    committer.abort(wait_s=1, discard_final=False)
    assert sink.published == [] and list(committer.uncommitted) == [1]


def test_a_sink_abort_waits_for_the_write_in_progress_and_drops_later_writes() -> None:
    writer = _BlockingWriter()
    committer = SinkCommitter(_Sink(writer), SinkContext("job", "sink"))
    batch = _batch(1, 2, 3)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        write = pool.submit(committer.write, batch)
        assert writer.writing.wait(timeout=30)
        abort = pool.submit(committer.abort, 30, discard_final=False)
        wait_until(lambda: committer.aborted, what="the abort to start")
        assert writer.calls == [] and not abort.done()  # the abort waits for the write
        writer.release.set()
        write.result(timeout=30)
        abort.result(timeout=30)
    committer.write(batch)  # after the abort: dropped
    assert writer.calls == ["write 3", "abort"]
    assert committer.rows == 3


def test_a_sink_abort_gives_up_waiting_for_a_write_blocked_on_its_external_system() -> None:
    writer = _BlockingWriter()
    committer = SinkCommitter(_Sink(writer), SinkContext("job", "sink"))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        write = pool.submit(committer.write, _batch(1))
        assert writer.writing.wait(timeout=30)
        committer.abort(0.05, discard_final=False)
        assert writer.calls == ["abort"]  # aborted under the blocked write
        writer.release.set()
        write.result(timeout=30)
