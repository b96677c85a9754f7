"""Channel state of unaligned checkpoints (no Ray): its Arrow form, and how a restore routes it after a rescale."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pytest

import onceflow as of
from onceflow.operators.keygroups import hash_columns, key_group_range
from onceflow.runtime.channel import ChannelMessage, channel_state_table, read_channel_state
from onceflow.runtime.deployment import replayed_channel_state
from onceflow.runtime.plan import Routing, plan


def _keyed_plan(parallelism: int) -> tuple[of.Dataflow, object]:
    flow = of.Dataflow("cs")
    events = flow.source(of.sources.TestingSource([{"user": "a", "t": 1}]), name="events")
    counted = events.key_by("user").process(lambda state, row: (state, row), name="count")
    counted.sink(of.sinks.TestingSink(), name="out")
    return flow, plan(flow, parallelism)


def _window_vertex(physical: object) -> object:
    return next(v for v in physical.vertices if not v.is_source)  # type: ignore[attr-defined]


def test_channel_state_keeps_channels_watermarks_rows_and_who_recorded_it() -> None:
    messages = [ChannelMessage(1, 5, pa.record_batch({"user": ["a", "b"], "t": [1, 2]}), ((1, 40),)),
                ChannelMessage(0, 9, None, ((0, 50),))]
    table = channel_state_table(messages, subtask=1, parallelism=3)
    assert table.schema.metadata[b"onceflow.subtask"] == b"1"
    back = read_channel_state(table)
    assert [(m.channel, m.batch.to_pylist() if m.batch is not None else None, m.watermarks) for m in back] == [
        (1, [{"user": "a", "t": 1}, {"user": "b", "t": 2}], ((1, 40),)), (0, None, ((0, 50),))]


def test_at_the_same_parallelism_a_subtask_replays_its_own_messages_as_recorded() -> None:
    _, physical = _keyed_plan(2)
    vertex = _window_vertex(physical)
    mine = channel_state_table([ChannelMessage(1, 0, pa.record_batch({"user": ["z"], "t": [3]}), ((1, 9),))],
                               subtask=1, parallelism=2)
    replayed = replayed_channel_state([mine], physical, vertex, 1)  # type: ignore[arg-type]
    assert [(m.channel, m.watermarks) for m in replayed] == [(1, ((1, 9),))]


@pytest.mark.parametrize(("before", "after"), [(2, 3), (3, 1), (1, 4)])
def test_after_a_rescale_every_in_flight_row_is_replayed_once_where_its_key_now_lives(before: int, after: int) -> None:
    _, physical = _keyed_plan(after)
    vertex = _window_vertex(physical)
    users = [f"user-{i}" for i in range(200)]
    old = [channel_state_table([ChannelMessage(0, 0, pa.record_batch({"user": users[s::before], "t": [1] * len(
        users[s::before])}), ((1, 5),))], subtask=s, parallelism=before) for s in range(before)]
    seen: list[str] = []
    for subtask in range(after):
        replayed = replayed_channel_state(old, physical, vertex, subtask)  # type: ignore[arg-type]
        assert all(m.watermarks == () for m in replayed)  # marks are dropped: watermarks restart conservatively
        rows = [u for m in replayed if m.batch is not None for u in m.batch.column("user").to_pylist()]
        owned = key_group_range(subtask, after, physical.max_parallelism)  # type: ignore[attr-defined]
        if rows:
            groups = hash_columns(pa.record_batch({"user": rows}), ["user"]) % physical.max_parallelism
            assert all(int(g) in owned for g in groups)
        seen += rows
    assert sorted(seen) == sorted(users)


def test_a_rescale_cannot_route_in_flight_rows_into_inputs_partitioned_in_different_ways() -> None:
    flow = of.Dataflow("mixed")
    left = flow.source(of.sources.TestingSource([{"user": "a"}]), name="left")
    right = flow.source(of.sources.TestingSource([{"user": "b"}]), name="right")
    left.union(right, parallelism=2).map(lambda r: r, name="both").sink(of.sinks.TestingSink(), name="out")
    physical = plan(flow, 2)
    union = next(v for v in physical.vertices if not v.is_source)
    upstream = next(v for v in physical.vertices if v.name == "left")
    upstream.outputs[0] = dataclasses.replace(upstream.outputs[0], routing=Routing.HASH, keys=("user",))
    old = channel_state_table([ChannelMessage(0, 0, pa.record_batch({"user": ["a"]}))], subtask=0, parallelism=1)
    with pytest.raises(of.PlanError, match="partitioned in different ways"):
        replayed_channel_state([old], physical, union, 0)
