"""A restart resets the subtask actors that survive in place: fencing in place must be as strong as a kill.

The unit tests drive one :class:`SubtaskActor` in this process (no Ray): what
a fenced attempt could still send (a push in flight from a fenced upstream)
never reaches the next attempt, calls in progress end at the fence, and a
sink write that does not return makes the fence report failure (the actor is
then killed, as recovery resolves transactions only with no writer alive).
The job test kills one actor of a running job and checks that the others
kept their processes and the output is exact.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import ray

import onceflow as of
from onceflow.checkpoint.two_phase_commit import SinkContext
from onceflow.runtime import subtask_actor
from onceflow.runtime.channel import ChannelMessage
from onceflow.runtime.deployment import AttemptId, RuntimeOptions
from onceflow.runtime.plan import PhysicalPlan, VertexSpec, plan
from onceflow.runtime.subtask_actor import SubtaskActor
from onceflow.testing import failpoints
from onceflow.testing.sink import TestingSinkWriter
from tests.helpers import actor_id, assert_feature_reference, feature_flow, wait_until


def _sink_vertex(sink: of.sinks.TestingSink) -> tuple[PhysicalPlan, VertexSpec]:
    """A plan whose last vertex is a sink alone, fed by one channel (no chaining)."""
    flow = of.Dataflow("in-place")
    flow.source(of.sources.TestingSource([{"k": 1}])).map_batches(lambda b: b, name="same").sink(sink)
    physical = plan(flow, 1, chaining=False)
    return physical, physical.vertices[-1]


def _message(seq: int, values: list[int]) -> ChannelMessage:
    return ChannelMessage(0, seq, pa.record_batch({"k": values}))


def _actor(physical: PhysicalPlan, vertex: VertexSpec, attempt: int) -> SubtaskActor:
    return SubtaskActor(physical, vertex.id, 0, RuntimeOptions(), None, None, attempt=AttemptId("run", attempt))


def test_a_push_from_a_fenced_attempt_never_reaches_the_next_one() -> None:
    """Attempt 1's message 0 arrives after the reset: it must not pass for attempt 2's message 0.

    Without the sender's attempt on every push, the late message would be
    taken as the new attempt's first, and the new one dropped as a repeat.
    """
    sink = of.sinks.TestingSink()
    sink.prepare()
    physical, vertex = _sink_vertex(sink)

    async def scenario() -> tuple[bool, bool, int]:
        actor = _actor(physical, vertex, 1)
        await actor.connect({})
        assert await actor.push(_message(0, [1, 2]), attempt=1)
        assert await actor.fence(1)
        await actor.reset(None, None, AttemptId("run", 2))
        await actor.connect({})
        late = await actor.push(_message(0, [7, 7, 7]), attempt=1)  # still in flight from a fenced upstream
        fresh = await actor.push(_message(0, [3]), attempt=2)
        return late, fresh, actor.metrics().operators["sink_2"]["records_in"]

    late, fresh, records_in = asyncio.run(scenario())
    assert (late, fresh) == (False, True)
    assert records_in == 1  # only attempt 2's row: neither the late rows nor attempt 1's count


def test_a_fence_ends_the_calls_in_progress_and_a_second_fence_answers_alike() -> None:
    """A push waits for the wiring that never comes; the fence ends it, and the actor refuses a stale reset."""
    sink = of.sinks.TestingSink()
    sink.prepare()
    physical, vertex = _sink_vertex(sink)

    async def scenario() -> tuple[Any, ...]:
        actor = _actor(physical, vertex, 1)
        waiting = asyncio.ensure_future(actor.push(_message(0, [1]), attempt=1))  # not wired: it waits
        await asyncio.sleep(0.05)
        assert not waiting.done()
        clean = await actor.fence(1)
        again = await actor.fence(1)
        other = await actor.fence(2)
        return clean, again, other, await waiting

    clean, again, other, pushed = asyncio.run(scenario())
    assert (clean, again, other, pushed) == (True, True, False, False)


def test_a_reset_without_a_clean_fence_is_refused() -> None:
    sink = of.sinks.TestingSink()
    sink.prepare()
    physical, vertex = _sink_vertex(sink)

    async def scenario() -> None:
        actor = _actor(physical, vertex, 1)
        await actor.reset(None, None, AttemptId("run", 2))

    with pytest.raises(RuntimeError, match="without a clean fence"):
        asyncio.run(scenario())


class _StuckSink(of.sinks.TestingSink):
    """A sink whose writes block until ``release`` is set (a row lock that never comes free)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.writing = threading.Event()

    def create_writer(self, ctx: SinkContext) -> TestingSinkWriter:
        writer = super().create_writer(ctx)
        write = writer.write

        def blocked(batch: pa.RecordBatch) -> None:
            self.writing.set()
            self.release.wait(30)
            write(batch)

        writer.write = blocked  # type: ignore[method-assign]
        return writer


def test_a_fence_with_a_sink_write_still_running_reports_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    """The write's thread cannot be stopped: the fence must say so, so that the job kills the actor."""
    monkeypatch.setattr(subtask_actor, "FENCE_WAIT_S", 0.2)
    sink = _StuckSink()
    sink.prepare()
    physical, vertex = _sink_vertex(sink)

    async def scenario() -> tuple[bool, Any]:
        actor = _actor(physical, vertex, 1)
        await actor.connect({})
        pushed = asyncio.ensure_future(actor.push(_message(0, [1]), attempt=1))
        await asyncio.to_thread(sink.writing.wait, 10)
        clean = await actor.fence(1)
        sink.release.set()
        return clean, await pushed

    try:
        clean, pushed = asyncio.run(scenario())
    finally:
        sink.release.set()
    assert (clean, pushed) == (False, False)


def _actor_ids(names: list[str]) -> dict[str, str | None]:
    return {name: actor_id(name) for name in names}


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "new-actors"])
def test_a_restart_keeps_the_surviving_actors_and_commits_exactly(tmp_path: Path, in_place: bool) -> None:
    """Kill one window actor: in place, every other actor keeps its process; otherwise all are new."""
    job = f"in-place-{int(in_place)}"
    sink = of.sinks.TestingSink()
    handle = of.submit(feature_flow(job, 60_000, sink, rate=10_000), parallelism=2,
                       checkpoint=of.CheckpointConfig(interval_s=0.2, storage=str(tmp_path / "chk")),
                       restart=of.RestartStrategy.fixed_delay(attempts=2, delay_s=0.0), restart_in_place=in_place)
    names = handle.actor_names
    wait_until(lambda: handle.view().get("checkpoints", {}).get("completed"), what="a completed checkpoint")
    before = _actor_ids(names)
    victim = next(n for n in names if "/window" in n)
    ray.kill(ray.get_actor(victim, namespace="onceflow"), no_restart=True)
    wait_until(lambda: handle.attempt == 2 and handle.status() is of.JobStatus.RUNNING, what="attempt 2 running")
    after = _actor_ids(names)
    result = handle.wait(120)
    assert result.metrics["restarts"] == 1
    assert_feature_reference(sink.table(), 60_000)
    new = sorted(n for n in names if after[n] != before[n])
    assert new == ([victim] if in_place else sorted(names)), (before, after)
    restart = handle.view()["restarts"][-1]
    assert restart["replaced"] == len(new)
    assert restart["fence_s"] >= 0 and restart["deploy_s"] > 0


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("point", ["subtask.reset", pytest.param("subtask.fence", marks=pytest.mark.slow)])
def test_a_survivor_that_dies_while_fenced_or_reset_is_replaced_and_the_output_stays_exact(
        tmp_path: Path, point: str) -> None:
    """A kill makes the job restart; one surviving actor then crashes inside the restart itself.

    Dying while fenced: that actor is replaced in the same restart. Dying
    while reset: deploying fails, and the next restart replaces it. Either
    way every row is committed once and nothing is left pending.
    """
    job = f"in-place-crash-{point.split('.')[1]}"
    sink = of.sinks.TestingSink()
    failpoints.arm(job, point)
    try:
        handle = of.submit(feature_flow(job, 40_000, sink, rate=10_000), parallelism=2,
                           checkpoint=of.CheckpointConfig(interval_s=0.2, storage=str(tmp_path / "chk")),
                           restart=of.RestartStrategy.fixed_delay(attempts=3, delay_s=0.0))
        wait_until(lambda: handle.view().get("checkpoints", {}).get("completed"), what="a completed checkpoint")
        victim = next(n for n in handle.actor_names if "/window" in n)
        ray.kill(ray.get_actor(victim, namespace="onceflow"), no_restart=True)
        result = handle.wait(120)
        assert not failpoints.armed(job, point), f"{point} never fired"
    finally:
        failpoints.disarm(job, point)
    assert_feature_reference(sink.table(), 40_000)
    assert sink.pending_ids() == []
    restarts = handle.view()["restarts"]
    if point == "subtask.fence":
        assert result.metrics["restarts"] == 1 and restarts[0]["replaced"] == 2
    else:
        # The first restart's deploy failed (the view lists restarts that deployed): the second replaced the crashed.
        assert result.metrics["restarts"] == 2 and [r["replaced"] for r in restarts] == [1]
    assert all(v is None for v in _actor_ids(handle.actor_names).values()), "an actor outlived the job"
