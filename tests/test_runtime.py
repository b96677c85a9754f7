"""End-to-end jobs on a real embedded Ray: results, actors, backpressure, errors."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import ray

import onceflow as of
from onceflow.testing.workload import feature_events
from tests.helpers import assert_feature_reference, wait_until

pytestmark = pytest.mark.usefixtures("ray_session")


def feature_flow(name: str, total: int, sink: of.sinks.TransactionalSink, batch_size: int = 20_000) -> of.Dataflow:
    flow = of.Dataflow(name)
    events = flow.source(of.sources.GeneratorSource(feature_events, total=total, batch_size=batch_size),
                         watermark=of.BoundedOutOfOrderness("event_time"))
    (events.key_by("user_id").window(of.windows.Tumbling(size_ms=10_000))
     .aggregate(count=of.agg.count(), total=of.agg.sum("amount")).sink(sink))
    return flow


@pytest.mark.parametrize("parallelism", [1, 2])
def test_feature_window_equals_numpy_reference(parallelism: int) -> None:
    sink = of.sinks.TestingSink()
    result = of.run(feature_flow(f"fw-{parallelism}", 300_000, sink), parallelism=parallelism)
    assert_feature_reference(sink.table(), 300_000)
    m = result.metrics
    assert m["events_in"] == 300_000
    assert m["events_out"] == sink.table().num_rows
    assert m["late_events"] == 0
    assert (m["checkpoints_completed"], m["restarts"]) == (0, 0)
    assert m["duration_s"] > 0


def test_feature_window_into_parquet_shows_exactly_the_committed_rows(tmp_path: Path) -> None:
    out = tmp_path / "out"
    of.run(feature_flow("fw-parquet", 200_000, of.sinks.ParquetSink(str(out))), parallelism=2)
    assert_feature_reference(ds.dataset(out, format="parquet").to_table(), 200_000)
    assert not [p for p in out.iterdir() if p.name.startswith(("_", "."))]


def test_named_actors_exist_while_the_job_runs() -> None:
    flow = feature_flow("named", 0, of.sinks.TestingSink())
    flow.nodes[0].spec = of.sources.GeneratorSource(feature_events, total=None, batch_size=1_000,
                                                    max_events_per_s=20_000)
    handle = of.submit(flow, parallelism=2)
    try:
        expected = {"named/source_0/0", "named/source_0/1", "named/window_2/0", "named/window_2/1"}
        assert set(handle.actor_names) == expected
        # One node (the embedded Ray, no checkpoints: no coordinator): every subtask on the driver's node.
        assert handle.placement() == {name.split("/", 1)[1]: ray.get_runtime_context().get_node_id()
                                      for name in expected}

        def listed() -> set[str]:
            return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["namespace"] == "onceflow" and a["name"].startswith("named/")}

        assert listed() - {"named/monitor"} == expected
        # Once the job runs, its monitor joins them (for onceflow jobs/watch).
        wait_until(lambda: listed() == expected | {"named/monitor"}, timeout_s=30, what="the job's monitor")
        wait_until(lambda: handle.metrics()["events_in"] > 2_000, what="events to flow")
        assert handle.status() is of.JobStatus.RUNNING
        result = handle.stop()
    finally:
        handle.cancel()
    assert result.metrics["events_in"] >= 2_000
    assert sum(r["count"] for r in flow.nodes[-1].spec.rows()) == result.metrics["events_in"]
    wait_until(lambda: not listed(), what="actors to go away")


def test_slow_sink_backpressures_the_source() -> None:
    """A slow sink holds the source back: records in flight stay within the credit bound."""
    batch, credits, sources = 1_000, 2, 2

    class SlowSink(of.sinks.TestingSink):
        def create_writer(self, ctx):
            writer = super().create_writer(ctx)
            write = writer.write

            def slow_write(b: pa.RecordBatch) -> None:
                time.sleep(0.02)
                write(b)

            writer.write = slow_write
            return writer

    flow = of.Dataflow("backpressure")
    events = flow.source(of.sources.GeneratorSource(feature_events, total=None, batch_size=batch))
    events.sink(SlowSink(), parallelism=1)
    handle = of.submit(flow, parallelism=sources, credits=credits, batch_bytes=1, linger_s=0.01)
    try:
        assert handle.actor_names == ["backpressure/source_0/0", "backpressure/source_0/1", "backpressure/sink_1/0"]
        bound = sources * (credits + 1) * batch  # per channel: credits in flight + one being produced
        samples = []
        for _ in range(20):
            m = handle.metrics()
            samples.append(m["operators"]["source_0"]["records_out"] - m["operators"]["sink_1"]["records_in"])
            time.sleep(0.1)
        final = handle.metrics()
        assert final["operators"]["source_0"]["records_out"] < 200_000, "the source was not held back"
        assert max(samples) <= bound, samples
        assert final["backpressure_s"] > 0.5
    finally:
        handle.cancel()


def test_a_killed_actor_fails_the_job_without_committing(tmp_path: Path) -> None:
    flow = feature_flow("killed", 0, of.sinks.ParquetSink(str(tmp_path / "out")))
    flow.nodes[0].spec = of.sources.GeneratorSource(feature_events, total=None, batch_size=2_000,
                                                    max_events_per_s=50_000)
    handle = of.submit(flow, parallelism=2)
    wait_until(lambda: handle.metrics()["events_out"] > 0, what="output to be written")
    ray.kill(ray.get_actor("killed/window_2/1", namespace="onceflow"))
    with pytest.raises(of.JobFailedError, match="killed/window_2/1"):
        handle.wait(timeout_s=60)
    assert handle.status() is of.JobStatus.FAILED
    assert ds.dataset(tmp_path / "out", format="parquet").count_rows() == 0
    # The surviving subtask aborted its sink: no file of it is left, not even a hidden one
    # (the killed subtask's in-progress file waits for the next run's recovery).
    assert not list((tmp_path / "out").glob("*killed-sink_3-0-*")), sorted((tmp_path / "out").iterdir())
