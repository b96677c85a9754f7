"""Helpers shared by the end-to-end tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

import msgpack
import numpy as np
import pyarrow as pa
import ray

import onceflow as of
from onceflow.operators.sources.base import Source, SourceContext, SourceReader
from onceflow.runtime.channel import ChannelMessage
from onceflow.testing.workload import feature_events, feature_window_reference

T = TypeVar("T")
"""What the polled condition returns."""


class FakeDownstream:
    """Stands in for a downstream actor handle: records what ``push.remote`` is given (and acknowledges it)."""

    def __init__(self) -> None:
        self.messages: list[ChannelMessage] = []
        self.attempts: list[int] = []
        self.push = self

    def remote(self, message: ChannelMessage, attempt: int) -> asyncio.Future[bool]:
        self.messages.append(message)
        self.attempts.append(attempt)
        done = asyncio.get_running_loop().create_future()
        done.set_result(True)
        return done


def fails_once_after(rows: int | None, then: Callable[[pa.RecordBatch], pa.RecordBatch] = lambda b: b,
                     ) -> Callable[[pa.RecordBatch], pa.RecordBatch]:
    """A ``map_batches`` function that raises ``ConnectionError`` once, after ``rows`` rows (never with ``None``).

    The count lives in the function, so only an executor that runs it in this
    process (the local one) sees it: the restarted attempt passes.
    """
    seen = [0]

    def flaky(batch: pa.RecordBatch) -> pa.RecordBatch:
        seen[0] += batch.num_rows
        if rows is not None and seen[0] > rows:
            seen[0] = -(10**12)  # once only
            msg = "the network blinked"
            raise ConnectionError(msg)
        return then(batch)

    return flaky


def wait_until(condition: Callable[[], T], timeout_s: float = 120.0, what: str = "condition") -> T:
    """Poll ``condition`` every 50 ms until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def feature_flow(name: str, total: int | None, sink: of.sinks.TransactionalSink, rate: int | None = None,
                 transform: Any = None) -> of.Dataflow:
    """The feature-window job of the recovery tests: windows named ``window``, the sink ``sink``."""
    flow = of.Dataflow(name)
    events = flow.source(of.sources.GeneratorSource(feature_events, total=total, batch_size=5_000,
                                                    max_events_per_s=rate),
                         watermark=of.BoundedOutOfOrderness("event_time"))
    if transform is not None:
        events = events.map_batches(transform, name="transform")
    (events.key_by("user_id").window(of.windows.Tumbling(size_ms=10_000))
     .aggregate(count=of.agg.count(), total=of.agg.sum("amount"), name="window").sink(sink, name="sink"))
    return flow


def actor_id(name: str) -> str | None:
    """The id of the live actor named ``name`` in the ``onceflow`` namespace, or ``None``."""
    try:
        return ray.get_actor(name, namespace="onceflow")._actor_id.hex()
    except ValueError:
        return None


def assert_feature_reference(table: pa.Table, total: int) -> None:
    """Assert that ``table`` holds exactly the feature-window output for ``total`` events, each row once."""
    order = [("window_start", "ascending"), ("user_id", "ascending")]
    assert table.column_names == ["user_id", "window_start", "window_end", "count", "total"], table.column_names
    got = table.sort_by(order)
    expected = feature_window_reference(total).sort_by(order)
    assert got.num_rows == expected.num_rows, f"{got.num_rows} rows committed, {expected.num_rows} expected"
    for column in ("user_id", "window_start", "window_end", "count"):
        assert got[column].equals(expected[column]), f"column {column} differs"
    np.testing.assert_allclose(got["total"].to_numpy(), expected["total"].to_numpy(), rtol=1e-9)


def read_ids(reader: SourceReader) -> list[list[int]]:
    """Read ``reader`` to its end; return each batch's ``id`` column."""
    out = []
    while (batch := reader.read()) is not None:
        assert isinstance(batch, pa.RecordBatch)
        out.append(batch.column("id").to_pylist())
    return out


def assert_resumes_from_every_offset(source: Source, ctx: SourceContext) -> None:
    """Assert that a reader rebuilt at each offset (msgpack round-tripped, as stored) reads exactly the rest."""
    expected = [i for batch in read_ids(source.build(ctx)) for i in batch]
    reader = source.build(ctx)
    consumed: list[int] = []
    while True:
        offset = msgpack.unpackb(msgpack.packb(reader.offset()))
        rest = [i for batch in read_ids(source.build(ctx, offset)) for i in batch]
        assert consumed + rest == expected, offset
        batch = reader.read()
        if batch is None:
            break
        assert isinstance(batch, pa.RecordBatch)
        consumed += batch.column("id").to_pylist()


def run_killing_a_subtask(flow: Any, storage: str, pick: Callable[[list[str]], str],
                          before_kill: Callable[[], T] | None = None, parallelism: int = 2,
                          ) -> tuple[Any, str, T | None]:
    """Run ``flow`` with checkpoints every 0.2 s and three restarts; kill one subtask actor mid-job.

    Once a checkpoint completed (and ``before_kill``, polled, returned
    something truthy), the actor ``pick(handle.actor_names)`` is killed without
    restart. Returns the job's result, the name killed and what ``before_kill``
    returned.
    """
    import ray

    import onceflow as of
    from onceflow.checkpoint.storage import CheckpointStorage

    handle = of.submit(flow, parallelism=parallelism, checkpoint=of.CheckpointConfig(interval_s=0.2, storage=storage),
                       restart=of.RestartStrategy.fixed_delay(attempts=3, delay_s=0.1))
    store = CheckpointStorage(storage, handle.job)
    name, seen = "", None
    try:
        wait_until(store.completed_ids, timeout_s=30, what="a first checkpoint")
        if before_kill is not None:
            seen = wait_until(before_kill, timeout_s=30, what="the moment to kill")
        name = pick(handle.actor_names)
        ray.kill(ray.get_actor(name, namespace="onceflow"), no_restart=True)
    finally:
        result = handle.wait(timeout_s=120)
    assert result.metrics["restarts"] >= 1, f"killing {name or 'a subtask'} restarted nothing"
    assert result.metrics["restored_from"], "the restart restored no checkpoint"
    return result, name, seen


def stop_process_group(process: Any, timeout_s: float = 20.0) -> None:
    """Stop ``process`` (a ``subprocess.Popen`` leading its own session) and everything in its process group.

    SIGTERM, then SIGKILL; returns once no member is left (a server's port is then closed).
    """
    import contextlib
    import os
    import signal

    group = process.pid
    for signal_ in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal_)
        deadline = time.monotonic() + timeout_s
        while _group_alive(group) and time.monotonic() < deadline:
            process.poll()  # reap the leader
            time.sleep(0.05)
        if not _group_alive(group):
            break
    process.wait()


def _group_alive(group: int) -> bool:
    """Whether a process of process group ``group`` is still running (zombies do not count)."""
    import os
    import subprocess

    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    listing = subprocess.run(["ps", "-eo", "pgid=,stat="], capture_output=True, text=True, check=True).stdout
    return any(int(p) == group and not s.startswith("Z") for p, s in (line.split() for line in listing.splitlines()))
