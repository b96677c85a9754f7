"""Exactly-once through real failures: killed subtask actors, a killed coordinator, a killed driver.

Each test compares the committed output with the failure-free reference: no
duplicate and no lost (user, window) row, and exact counts.
"""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import ray

import onceflow as of
from onceflow.checkpoint.storage import CheckpointStorage
from onceflow.testing.workload import feature_events
from tests.helpers import assert_feature_reference, wait_until

pytestmark = pytest.mark.usefixtures("ray_session")

ROOT = Path(__file__).resolve().parent.parent


def feature_flow(name: str, total: int, rate: int, sink: of.sinks.TransactionalSink,
                 skew_s: float = 0.0) -> of.Dataflow:
    """The feature-window job; ``skew_s`` slows source subtask 1 per batch so barriers arrive far apart."""

    def skew(batch: pa.RecordBatch) -> pa.RecordBatch:
        if (batch["event_time"][0].as_py() // 5_000) % 2:  # subtask 1 reads the odd batches
            time.sleep(skew_s)
        return batch

    flow = of.Dataflow(name)
    events = flow.source(of.sources.GeneratorSource(feature_events, total=total, batch_size=5_000,
                                                    max_events_per_s=rate),
                         watermark=of.BoundedOutOfOrderness("event_time"))
    if skew_s:
        events = events.map_batches(skew, name="skew")
    (events.key_by("user_id").window(of.windows.Tumbling(size_ms=10_000))
     .aggregate(count=of.agg.count(), total=of.agg.sum("amount")).sink(sink))
    return flow


def completed(storage: str, job: str) -> int:
    ids = CheckpointStorage(storage, job).completed_ids()
    return ids[-1] if ids else 0


def test_checkpointed_job_without_failures_commits_exactly_the_reference(tmp_path: Path) -> None:
    sink = of.sinks.TestingSink()
    result = of.run(feature_flow("eo-clean", 300_000, 300_000, sink), parallelism=2,
                    checkpoint=of.CheckpointConfig(interval_s=0.2, storage=str(tmp_path)))
    assert_feature_reference(sink.table(), 300_000)
    m = result.metrics
    assert m["checkpoints_completed"] >= 2 and m["restarts"] == 0
    assert m["checkpoint_duration_p99_s"] > 0 and m["state_bytes_last"] >= 0
    history = CheckpointStorage(str(tmp_path), "eo-clean").history()
    assert [h["checkpoint_id"] for h in history] == sorted(h["checkpoint_id"] for h in history)
    assert all({"duration_s", "alignment_s", "sync_s", "async_s", "start_delay_s", "state_bytes"} <= set(h)
               for h in history)
    assert len(CheckpointStorage(str(tmp_path), "eo-clean").completed_ids()) <= 3  # retain=3


def chaos(tmp_path: Path, job: str, total: int, kills: int, parallelism: int, seed: int) -> None:
    """Kill random named subtask actors ``kills`` times (the coordinator once), each after a new checkpoint.

    Source subtask 1 is slowed down, so barriers reach the window operators far
    apart and alignment must hold the faster channel back.
    """
    storage = str(tmp_path / "chk")
    sink = of.sinks.TestingSink()
    handle = of.submit(feature_flow(job, total, 100_000, sink, skew_s=0.1), parallelism=parallelism,
                       checkpoint=of.CheckpointConfig(interval_s=0.25, storage=storage),
                       restart=of.RestartStrategy.fixed_delay(attempts=kills + 5, delay_s=0.1))
    rng = random.Random(seed)
    killed: list[str] = []
    errors: list[BaseException] = []

    def killer() -> None:
        try:
            for round_ in range(kills):
                last = completed(storage, job)
                wait_until(lambda last=last: completed(storage, job) > last, what="a new checkpoint")
                name = f"{job}/coordinator" if round_ == 2 else rng.choice(handle.actor_names)
                ray.kill(ray.get_actor(name, namespace="onceflow"), no_restart=round_ % 2 == 0)
                killed.append(name)
        except BaseException as error:  # reported by the test
            errors.append(error)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = handle.wait(timeout_s=600)
    thread.join(timeout=10)
    assert not errors, errors
    assert len(killed) == kills and f"{job}/coordinator" in killed
    assert result.metrics["restarts"] == kills
    assert result.metrics["restored_from"], "no restart restored a checkpoint"
    assert_feature_reference(sink.table(), total)


def test_killed_subtasks_and_coordinator_change_nothing_committed(tmp_path: Path) -> None:
    """Four random subtask kills and one coordinator kill, mid-stream."""
    chaos(tmp_path, "eo-chaos", total=500_000, kills=5, parallelism=2, seed=7)


@pytest.mark.slow
def test_long_chaos_run_at_parallelism_three(tmp_path: Path) -> None:
    """A longer run: 2 M events, 12 kills, three subtasks per operator."""
    chaos(tmp_path, "eo-chaos-long", total=2_000_000, kills=12, parallelism=3, seed=11)


def test_a_killed_driver_resumes_from_durable_storage_alone(tmp_path: Path) -> None:
    """SIGKILL the driver (its embedded Ray and object store die with it); a fresh Ray resumes from files."""
    total, storage, out = 400_000, tmp_path / "chk", tmp_path / "out"
    command = [sys.executable, str(ROOT / "tests/jobs/feature_job.py"), "--storage", str(storage),
               "--out", str(out), "--events", str(total), "--rate", "60000"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: completed(str(storage), "durable") >= 3, timeout_s=180, what="three checkpoints")
    finally:
        first.kill()
        first.wait()
    committed_before = ds.dataset(out, format="parquet").count_rows()
    second = subprocess.run([*command[:-2], "--resume"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert second.returncode == 0, second.stderr[-3000:]
    assert '"restored_from": [' in second.stdout and '"restored_from": []' not in second.stdout
    assert committed_before > 0
    assert_feature_reference(ds.dataset(out, format="parquet").to_table(), total)
    assert not [p.name for p in out.iterdir() if p.name.startswith(("_", "."))]


class _HoldBadInputUntilACheckpoint(of.sources.Source):
    """Wraps a source: a batch with null event times waits until a checkpoint of ``job`` completed.

    So the job has committed something before the bad input arrives, however
    slow the machine; the reader idles meanwhile, so barriers still pass.
    """

    def __init__(self, inner: of.sources.Source, storage: str, job: str) -> None:
        self.inner, self.storage, self.job = inner, storage, job

    def build(self, ctx, resume_offset=None) -> of.sources.SourceReader:
        return _HeldReader(self.inner.build(ctx, resume_offset), CheckpointStorage(self.storage, self.job))


class _HeldReader(of.sources.SourceReader):
    def __init__(self, inner: of.sources.SourceReader, storage: CheckpointStorage) -> None:
        self._inner, self._storage = inner, storage
        self._held: pa.RecordBatch | None = None
        self._offset_before_held = None

    def read(self):
        if self._held is None:
            offset = self._inner.offset()
            item = self._inner.read()
            if not isinstance(item, pa.RecordBatch) or item["event_time"].null_count == 0:
                return item
            self._held, self._offset_before_held = item, offset
        if not self._storage.completed_ids():
            return of.sources.Idle(0.02)
        batch, self._held = self._held, None
        return batch

    def offset(self):
        return self._offset_before_held if self._held is not None else self._inner.offset()

    def close(self) -> None:
        self._inner.close()


def test_bad_input_fails_at_once_and_keeps_what_was_committed(tmp_path: Path) -> None:
    def poisoned(offset: int, n: int) -> pa.RecordBatch:
        batch = feature_events(offset, n)
        if offset < 100_000:
            return batch
        return batch.set_column(2, "event_time", pa.array([None] * n, pa.int64()))

    flow = of.Dataflow("eo-bad")
    generator = of.sources.GeneratorSource(poisoned, total=200_000, batch_size=5_000, max_events_per_s=100_000)
    events = flow.source(_HoldBadInputUntilACheckpoint(generator, str(tmp_path / "chk"), "eo-bad"),
                         watermark=of.BoundedOutOfOrderness("event_time"))
    events.map_batches(lambda b: b.select(["event_time"])).sink(of.sinks.ParquetSink(str(tmp_path / "out")))
    events.key_by("user_id").window(of.windows.Tumbling(size_ms=10_000)).aggregate(n=of.agg.count()).sink(
        of.sinks.TestingSink())
    expected = r"'source_0': event time column 'event_time' has 5000 null values"
    with pytest.raises(of.JobFailedError, match=expected) as info:
        of.run(flow, checkpoint=of.CheckpointConfig(interval_s=0.2, storage=str(tmp_path / "chk")),
               restart=of.RestartStrategy.fixed_delay(attempts=5, delay_s=0.1))
    assert "gave up" not in str(info.value)  # not retried: the input itself is bad
    committed = ds.dataset(tmp_path / "out", format="parquet").to_table()
    times = committed["event_time"].to_numpy()
    assert committed.num_rows > 0 and times.max() < 100_000
    assert len(np.unique(times)) == committed.num_rows  # nothing committed twice


def test_restarts_are_bounded_and_the_error_says_where_to_resume(tmp_path: Path) -> None:
    def flaky(batch: pa.RecordBatch) -> pa.RecordBatch:
        if batch["event_time"][0].as_py() >= 50_000:
            raise RuntimeError("downstream service unavailable")
        return batch

    flow = of.Dataflow("eo-give-up")
    events = flow.source(of.sources.GeneratorSource(feature_events, total=100_000, batch_size=5_000,
                                                    max_events_per_s=50_000))
    events.map_batches(flaky, name="enrich").sink(of.sinks.TestingSink())
    with pytest.raises(of.JobFailedError, match=r"'enrich'.*downstream service unavailable.*gave up after 2 "
                                                r"restart\(s\).*resume from checkpoint \d+"):
        of.run(flow, checkpoint=of.CheckpointConfig(interval_s=0.1, storage=str(tmp_path)),
               restart=of.RestartStrategy.fixed_delay(attempts=2, delay_s=0.05))


def test_an_injected_crash_in_the_source_replays_every_event_once(tmp_path: Path) -> None:
    """Bytewax-style: ABORT() crashes the source once; the job restarts and commits each event once."""
    rows = [{"user": f"u{i % 7}", "amount": i} for i in range(1_000)]
    items = [*rows[:600], of.sources.TestingSource.ABORT(), *rows[600:]]
    flow = of.Dataflow("eo-abort")
    events = flow.source(of.sources.TestingSource(items, batch_size=25))
    sink = of.sinks.TestingSink()

    def running_total(total, row):
        total = (total or 0) + row["amount"]
        return total, {"user": row["user"], "amount": row["amount"], "running": total}

    events.key_by("user").process(running_total).sink(sink)
    result = of.run(flow, parallelism=2, checkpoint=of.CheckpointConfig(interval_s=0.05, storage=str(tmp_path)),
                    restart=of.RestartStrategy.fixed_delay(attempts=2, delay_s=0.05))
    assert result.metrics["restarts"] == 1
    committed = sorted((r["user"], r["amount"], r["running"]) for r in sink.rows())
    expected, totals = [], {}
    for row in rows:
        totals[row["user"]] = totals.get(row["user"], 0) + row["amount"]
        expected.append((row["user"], row["amount"], totals[row["user"]]))
    assert committed == sorted(expected)


class _SlowCommitSink(of.sinks.TestingSink):
    """A TestingSink whose commits take 0.3 s and log when each starts and ends to ``log_dir``."""

    def __init__(self, log_dir: Path) -> None:
        super().__init__()
        self.log_dir = log_dir

    def create_committer(self, ctx):
        committer = super().create_committer(ctx)
        commit = committer.commit
        log = self.log_dir / f"commits-{ctx.subtask}.log"

        def slow_commit(committables) -> None:
            started = time.monotonic()
            time.sleep(0.3)
            commit(committables)
            with log.open("a") as file:
                file.write(f"{started} {time.monotonic()} {' '.join(c.id for c in committables)}\n")

        committer.commit = slow_commit
        return committer


def test_a_commit_slower_than_the_checkpoint_interval_commits_each_transaction_once(tmp_path: Path) -> None:
    """Notifications that arrive while a commit runs wait for it: no overlapping commit of the same transaction."""
    sink = _SlowCommitSink(tmp_path)
    result = of.run(feature_flow("eo-slow-commit", 200_000, 200_000, sink), parallelism=2,
                    checkpoint=of.CheckpointConfig(interval_s=0.1, storage=str(tmp_path / "checkpoints")))
    assert result.metrics["checkpoints_completed"] >= 3 and result.metrics["restarts"] == 0
    for log in sorted(tmp_path.glob("commits-*.log")):
        lines = map(str.split, log.read_text().splitlines())
        calls = sorted((float(start), float(end), ids) for start, end, *ids in lines)
        for (_, end, _), (start, _, _) in itertools.pairwise(calls):
            assert end <= start, f"{log.name}: two commits ran at once"
        ids = [c for *_, names in calls for c in names]
        assert len(ids) == len(set(ids)), f"{log.name}: a transaction was committed twice"
    assert_feature_reference(sink.table(), 200_000)
