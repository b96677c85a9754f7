"""Pipelines end to end on the in-process executor: operators, routing, side outputs and clear errors.

These are logic tests: they run the real subtasks, channels and sinks in this
process (``executor="local"``) in milliseconds. What needs Ray itself (actors,
kills, backpressure between processes) is in test_runtime.py and the recovery tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest

import onceflow as of
from onceflow.testing.workload import feature_events


def test_stateless_chain_union_and_rebalance() -> None:
    flow = of.Dataflow("chain")
    items = [{"x": i} for i in range(20)]
    source = flow.source(of.sources.TestingSource(items, batch_size=3))
    evens = source.filter(lambda r: r["x"] % 2 == 0).map(lambda r: {"x": r["x"] * 10})
    odds = source.map_batches(lambda b: b.filter(pc.equal(pc.bit_wise_and(b["x"], 1), 1)))
    tripled = evens.union(odds).flat_map(lambda r: [r] * 3, parallelism=2)
    sink = of.sinks.TestingSink()
    tripled.sink(sink)
    of.run(flow, parallelism=2, executor="local")
    got = sorted(sink.table().column("x").to_pylist())
    assert got == sorted([x * 10 for x in range(0, 20, 2)] * 3 + list(range(1, 20, 2)) * 3)


def test_keyed_process_and_late_events_side_output() -> None:
    rows = [{"user": u, "t": t} for u, t in [("a", 1), ("b", 2), ("a", 15), ("b", 16), ("a", 3), ("a", 25)]]
    flow = of.Dataflow("late")
    events = flow.source(of.sources.TestingSource(rows, batch_size=2),
                         watermark=of.BoundedOutOfOrderness("t", max_delay_ms=0))
    windows = events.key_by("user").window(of.windows.Tumbling(size_ms=10)).aggregate(n=of.agg.count())
    late, counted, running = of.sinks.TestingSink(), of.sinks.TestingSink(), of.sinks.TestingSink()
    windows.sink(counted)
    windows.late_events().sink(late)
    events.key_by("user").process(lambda s, r: ((s or 0) + 1, {"user": r["user"], "seen": (s or 0) + 1})).sink(
        running)
    result = of.run(flow, parallelism=2, executor="local")
    assert late.rows() == [{"user": "a", "t": 3}]
    assert sorted((r["user"], r["window_start"], r["n"]) for r in counted.rows()) == [
        ("a", 0, 1), ("a", 10, 1), ("a", 20, 1), ("b", 0, 1), ("b", 10, 1)]
    assert sorted((r["user"], r["seen"]) for r in running.rows()) == [
        ("a", 1), ("a", 2), ("a", 3), ("a", 4), ("b", 1), ("b", 2)]
    assert result.metrics["late_events"] == 1


def test_missing_key_column_fails_cleanly_and_leaves_nothing_visible(tmp_path: Path) -> None:
    flow = of.Dataflow("badkey")
    events = flow.source(of.sources.GeneratorSource(feature_events, total=50_000, batch_size=5_000),
                         watermark=of.BoundedOutOfOrderness("event_time"))
    events.map_batches(lambda b: b).sink(of.sinks.ParquetSink(str(tmp_path / "side")))
    events.key_by("account").window(of.windows.Tumbling(size_ms=1_000)).aggregate(n=of.agg.count()).sink(
        of.sinks.ParquetSink(str(tmp_path / "out")))
    with pytest.raises(of.JobFailedError, match="key_by_3.*'account' is missing") as info:
        of.run(flow, parallelism=2, executor="local")
    assert info.value.operator == "key_by_3"
    for directory in ("side", "out"):
        if (tmp_path / directory).exists():
            assert ds.dataset(tmp_path / directory, format="parquet").count_rows() == 0


def test_wrong_time_column_type_names_operator_and_column() -> None:
    flow = of.Dataflow("badtime")
    rows = [{"user": "a", "t": "yesterday"}]
    events = flow.source(of.sources.TestingSource(rows), watermark=of.BoundedOutOfOrderness("t"))
    events.sink(of.sinks.TestingSink())
    with pytest.raises(of.JobFailedError, match=r"source_0.*column 't' has type string"):
        of.run(flow, executor="local")


def test_map_batches_changing_schema_is_reported() -> None:
    flow = of.Dataflow("badschema")
    events = flow.source(of.sources.GeneratorSource(feature_events, total=30_000, batch_size=10_000))
    events.map_batches(lambda b: b if b["event_time"][0].as_py() == 0 else b.drop_columns(["amount"]),
                       name="shape").sink(of.sinks.TestingSink())
    with pytest.raises(of.JobFailedError, match=r"'shape': map_batches returned schema.*'amount'"):
        of.run(flow, executor="local")


def test_non_deterministic_generator_is_detected() -> None:
    rng = np.random.default_rng()

    def random_batch(offset: int, n: int) -> pa.RecordBatch:
        return pa.record_batch({"x": rng.integers(0, 10, n)})

    flow = of.Dataflow("nondet")
    flow.source(of.sources.GeneratorSource(random_batch, total=100, batch_size=10)).sink(of.sinks.TestingSink())
    with pytest.raises(of.JobFailedError, match="not deterministic"):
        of.run(flow, executor="local")
