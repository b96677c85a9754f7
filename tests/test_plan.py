"""Planning: names, parallelism, chaining and routing."""

from __future__ import annotations

import pyarrow as pa
import pytest

from onceflow.errors import PlanError
from onceflow.operators.sources.generator import GeneratorSource
from onceflow.operators.watermark import BoundedOutOfOrderness
from onceflow.runtime.dataflow import Dataflow
from onceflow.runtime.plan import Routing, plan
from onceflow.testing.sink import TestingSink
from onceflow.testing.source import TestingSource
from onceflow.testing.workload import feature_events


def generator() -> GeneratorSource:
    return GeneratorSource(feature_events, total=100, batch_size=10)


def test_default_names_are_stable_and_unique() -> None:
    flow = Dataflow("job")
    s = flow.source(generator())
    s.map(lambda r: r).filter(lambda r: True).sink(TestingSink())
    assert [n.name for n in flow.nodes] == ["source_0", "map_1", "filter_2", "sink_3"]
    with pytest.raises(PlanError, match="'map_1' is used twice"):
        s.map(lambda r: r, name="map_1")


def test_stateless_chain_is_fused_into_the_source() -> None:
    flow = Dataflow("job")
    flow.source(generator()).map(lambda r: r).filter(lambda r: True).map(lambda r: r).sink(TestingSink())
    physical = plan(flow, parallelism=2)
    assert [v.operators for v in physical.vertices] == [["source_0", "map_1", "filter_2", "map_3", "sink_4"]]
    assert physical.vertices[0].parallelism == 2


def test_key_by_breaks_the_chain_with_a_hash_exchange() -> None:
    from onceflow.operators import agg
    from onceflow.operators.windows import Tumbling

    flow = Dataflow("job")
    events = flow.source(generator(), watermark=BoundedOutOfOrderness("event_time"))
    events.key_by("user_id").window(Tumbling(size_ms=10)).aggregate(n=agg.count()).sink(TestingSink())
    physical = plan(flow, parallelism=2)
    assert [v.operators for v in physical.vertices] == [["source_0"], ["window_2", "sink_3"]]
    (edge,) = physical.vertices[0].outputs
    assert edge.routing is Routing.HASH and edge.keys == ("user_id",) and edge.key_by == "key_by_1"
    assert physical.vertices[1].input_channels == 2


def test_parallelism_mismatch_rebalances() -> None:
    flow = Dataflow("job")
    flow.source(TestingSource([{"x": 1}])).map(lambda r: r, parallelism=3).sink(TestingSink())
    physical = plan(flow, parallelism=2)
    assert [(v.operators, v.parallelism) for v in physical.vertices] == [(["source_0"], 1), (["map_1", "sink_2"], 3)]
    assert physical.vertices[0].outputs[0].routing is Routing.REBALANCE
    assert physical.vertices[1].input_channels == 1


def test_fan_out_and_union_are_not_chained() -> None:
    flow = Dataflow("job")
    s = flow.source(generator())
    left = s.map(lambda r: r)
    right = s.map_batches(lambda b: b)
    left.union(right).sink(TestingSink())
    physical = plan(flow, parallelism=1)
    assert [v.operators for v in physical.vertices] == [
        ["source_0"], ["map_1"], ["map_batches_2"], ["union_3", "sink_4"]]
    assert physical.vertices[3].input_channels == 2


def test_a_flow_without_sink_is_rejected() -> None:
    flow = Dataflow("job")
    flow.source(generator()).map(lambda r: r)
    with pytest.raises(PlanError, match="has no sink"):
        plan(flow)


def test_window_without_event_time_is_rejected() -> None:
    from onceflow.operators.windows import Tumbling

    flow = Dataflow("job")
    with pytest.raises(PlanError, match="no event time"):
        flow.source(generator()).key_by("user_id").window(Tumbling(size_ms=10))


def test_bad_names_and_parallelism_are_rejected() -> None:
    with pytest.raises(PlanError):
        Dataflow("a/b")
    flow = Dataflow("job")
    with pytest.raises(PlanError, match="parallelism must be >= 1"):
        flow.source(generator(), parallelism=0)
    flow.source(generator()).key_by("user_id").process(lambda s, r: (s, None)).sink(TestingSink())
    with pytest.raises(PlanError, match="exceeds max_parallelism"):
        plan(flow, parallelism=8, max_parallelism=4)


def test_testing_source_is_limited_to_one_subtask() -> None:
    flow = Dataflow("job")
    flow.source(TestingSource([pa.record_batch({"x": [1]})]), parallelism=2).sink(TestingSink())
    with pytest.raises(PlanError, match="at most 1 subtasks"):
        plan(flow)
