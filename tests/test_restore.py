"""Restoring checkpointed state onto a plan: rescaling, source splits, operator identity.

The unit tests drive :func:`onceflow.runtime.restore.assign_restored_state` and the
real source readers without Ray; the last tests resume real jobs at another
parallelism and after a step was inserted into the graph.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

import onceflow as of
from onceflow.checkpoint.storage import CheckpointStorage
from onceflow.errors import PlanError
from onceflow.operators import agg
from onceflow.operators.keygroups import key_group_range
from onceflow.operators.sources.base import RescaledOffsets, Source, SourceContext, SplitCursor, deal_cursors
from onceflow.operators.sources.generator import GeneratorSource
from onceflow.operators.watermark import BoundedOutOfOrderness
from onceflow.operators.windows import Tumbling
from onceflow.runtime.dataflow import Dataflow
from onceflow.runtime.plan import PhysicalPlan, plan
from onceflow.runtime.restore import assign_restored_state, restored_sink_states
from onceflow.testing.sink import TestingSink
from tests.helpers import wait_until

# -- operator identity ------------------------------------------------------------------------------------------


def ids_rows(offset: int, n: int) -> pa.RecordBatch:
    return pa.record_batch({"id": list(range(offset, offset + n)), "t": list(range(offset, offset + n))})


def windowed(*, insert_map: bool = False, window_name: str | None = None, add_branch: bool = False,
             source_name: str | None = None) -> Dataflow:
    flow = Dataflow("identity")
    events = flow.source(GeneratorSource(ids_rows, total=100, batch_size=10), name=source_name,
                         watermark=BoundedOutOfOrderness("t"))
    if add_branch:
        events.map(lambda row: row).sink(TestingSink())
    if insert_map:
        events = events.map_batches(lambda batch: batch)
    events.key_by("id").window(Tumbling(size_ms=10)).aggregate(n=agg.count(), name=window_name).sink(TestingSink())
    return flow


def uids(flow: Dataflow) -> dict[str, str]:
    return {node.name: node.uid for node in flow.nodes}


def test_an_explicit_name_is_the_uid_and_defaults_derive_from_the_structure() -> None:
    flow = windowed(window_name="counts")
    assert uids(flow)["counts"] == "counts"
    assert uids(flow)["source_0"].startswith("source~") and uids(flow)["sink_3"].startswith("sink~")
    assert uids(windowed()) == uids(windowed())  # the same graph, built again, has the same uids


def test_inserting_a_step_changes_the_uids_downstream_of_it_only() -> None:
    before, after = uids(windowed()), uids(windowed(insert_map=True))
    assert before["source_0"] == after["source_0"]
    assert before["window_2"] != after["window_3"]
    named_before, named_after = uids(windowed(window_name="w")), uids(windowed(window_name="w", insert_map=True))
    assert named_before["w"] == named_after["w"] == "w"
    assert named_before["sink_3"] == named_after["sink_4"]  # its input's uid is pinned by the name


def test_a_branch_added_elsewhere_keeps_the_other_uids() -> None:
    before = windowed()
    after = windowed(add_branch=True)
    window = {n.uid for n in before.nodes if n.name.startswith("window")}
    assert window <= {n.uid for n in after.nodes}
    assert [n.name for n in after.nodes if n.uid in window] == ["window_4"]  # renamed, same identity


def test_identical_siblings_get_distinct_uids_and_uids_differ_from_names() -> None:
    flow = Dataflow("twins")
    events = flow.source(GeneratorSource(ids_rows, total=10))
    events.map(lambda row: row).sink(TestingSink())
    events.map(lambda row: row).sink(TestingSink())
    all_uids = [n.uid for n in flow.nodes]
    assert len(set(all_uids)) == len(all_uids)
    assert not {n.uid for n in flow.nodes if "~" in n.uid} & {n.name for n in flow.nodes}


def test_the_key_columns_are_part_of_a_keyed_operators_identity() -> None:
    def keyed(column: str) -> str:
        flow = Dataflow("keys")
        events = flow.source(GeneratorSource(ids_rows, total=10), watermark=BoundedOutOfOrderness("t"))
        events.key_by(column).window(Tumbling(size_ms=10)).aggregate(n=agg.count()).sink(TestingSink())
        return next(n.uid for n in flow.nodes if n.name.startswith("window"))

    assert keyed("id") != keyed("t")


# -- assign_restored_state -------------------------------------------------------------------------------------


def keyed_plan(parallelism: int, *, chaining: bool = True, max_parallelism: int = 16) -> PhysicalPlan:
    flow = Dataflow("rescale")
    events = flow.source(GeneratorSource(ids_rows, total=100, batch_size=10), name="events",
                         watermark=BoundedOutOfOrderness("t"))
    (events.map_batches(lambda batch: batch, name="prep").key_by("id").window(Tumbling(size_ms=10))
     .aggregate(n=agg.count(), name="counts").map_batches(lambda batch: batch, name="post").sink(TestingSink(),
                                                                                               name="out"))
    return plan(flow, parallelism, chaining=chaining, max_parallelism=max_parallelism)


def checkpoint_of(physical: PhysicalPlan, *, runtime: bool = False) -> dict[str, dict[str, str]]:
    """A restore point whose handles say where they came from: ``"<task>:<key>"``."""
    states: dict[str, dict[str, str]] = {}
    for vertex in physical.vertices:
        for subtask in range(vertex.parallelism):
            task = f"{vertex.name}/{subtask}"
            keys = [n.uid for n in vertex.nodes if n.name != "prep" and n.name != "post"]
            keys += ["@input_watermarks"] if runtime and not vertex.is_source else []
            states[task] = {key: f"{task}:{key}" for key in keys}
    return states


@pytest.mark.parametrize("after", range(1, 6))
@pytest.mark.parametrize("before", range(1, 6))
def test_every_key_group_is_restored_exactly_once_after_a_rescale(before: int, after: int) -> None:
    old, new = keyed_plan(before), keyed_plan(after)
    assigned = assign_restored_state(new, checkpoint_of(old))
    for subtask in range(after):
        handles = assigned[f"counts/{subtask}"]["counts"]
        owners = [int(h.split(":")[0].split("/")[1]) for h in handles]
        mine = set(key_group_range(subtask, after, 16))
        # Every key group of this subtask is in exactly one of the handles it gets (each old subtask's state
        # holds its own key groups), and each handle it gets holds at least one of them.
        covered = collections.Counter(g for o in owners for g in key_group_range(o, before, 16) if g in mine)
        assert set(covered) == mine and set(covered.values()) == {1}
        assert all(mine & set(key_group_range(o, before, 16)) for o in owners)
        assert owners == sorted(owners)


@pytest.mark.parametrize(("before", "after"), [(1, 3), (3, 1), (2, 2), (4, 3)])
def test_sources_get_every_old_offset_in_subtask_order_and_sinks_none(before: int, after: int) -> None:
    assigned = assign_restored_state(keyed_plan(after), checkpoint_of(keyed_plan(before)))
    for subtask in range(after):
        assert assigned[f"events/{subtask}"]["events"] == [f"events/{i}:events" for i in range(before)]
        assert "out" not in assigned[f"counts/{subtask}"]


def test_an_unchanged_plan_restores_every_task_its_own_state() -> None:
    physical = keyed_plan(3)
    old = checkpoint_of(physical, runtime=True)
    assigned = assign_restored_state(physical, old)
    for task, keys in old.items():
        for key, handle in keys.items():
            if key == "out":
                continue
            if key == "events":  # every reader's offset; the actor picks its own at the same parallelism
                assert assigned[task][key] == [f"events/{i}:events" for i in range(3)]
            else:
                assert assigned[task][key] == [handle]


def test_another_chaining_finds_the_state_by_uid() -> None:
    old, new = keyed_plan(2, chaining=True), keyed_plan(2, chaining=False)
    assert [v.name for v in new.vertices] != [v.name for v in old.vertices]
    assigned = assign_restored_state(new, checkpoint_of(old))
    assert assigned["counts/1"] == {"counts": ["counts/1:counts"]}
    assert assigned["out/0"] == {}


def test_runtime_entries_follow_their_vertex_name() -> None:
    old = checkpoint_of(keyed_plan(2), runtime=True)
    same = assign_restored_state(keyed_plan(2), old)
    assert same["counts/1"]["@input_watermarks"] == ["counts/1:@input_watermarks"]
    rescaled = assign_restored_state(keyed_plan(3), old)
    for subtask in range(3):
        assert rescaled[f"counts/{subtask}"]["@input_watermarks"] == [
            "counts/0:@input_watermarks", "counts/1:@input_watermarks"]
    unchained = assign_restored_state(keyed_plan(2, chaining=False), old)  # no vertex of that name: dropped
    assert all("@input_watermarks" not in keys for task, keys in unchained.items() if not task.startswith("counts"))


def test_state_that_matches_no_operator_is_refused_with_its_name() -> None:
    old = {"events/0": {"events": "a"}, "window_2/0": {"window~0123456789abcdef": "b"},
           "window_2/1": {"window~0123456789abcdef": "c", "@input_watermarks": "d"}}
    with pytest.raises(PlanError, match=r"'window~0123456789abcdef' \(in tasks 'window_2/0', 'window_2/1'\)"
                                        r".*allow_non_restored_state=True") as info:
        assign_restored_state(keyed_plan(2), old)
    assert "'events'" not in str(info.value) and "@input_watermarks" not in str(info.value)


def test_allow_non_restored_state_drops_it_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    old = {"events/0": {"events": "a", "gone": "b"}}
    with caplog.at_level(logging.WARNING, logger="onceflow"):
        assigned = assign_restored_state(keyed_plan(1), old, allow_non_restored_state=True)
    assert assigned["events/0"] == {"events": ["a"]}
    assert "'gone'" in caplog.text and "allow_non_restored_state=True" in caplog.text


def test_restored_sink_states_lists_every_old_subtask_of_each_sink() -> None:
    old = checkpoint_of(keyed_plan(2))
    assert restored_sink_states(keyed_plan(3), old) == {"out": ["counts/0:out", "counts/1:out"]}


def test_a_malformed_task_name_is_a_plan_error() -> None:
    with pytest.raises(PlanError, match="'events' is not '<operator>/<subtask>'"):
        assign_restored_state(keyed_plan(1), {"events": {"events": "a"}})


# -- sources across rescales: every split read exactly once, by the real readers --------------------------------


def read_across_rescales(source: Source, parallelisms: list[int], reads: list[list[int]]) -> list[int]:
    """Read ``source`` at each parallelism in turn, each subtask ``reads[stage][subtask]`` batches, then resume.

    The offsets travel as the runtime hands them over: msgpack round-tripped,
    the own offset at an unchanged parallelism and :class:`RescaledOffsets`
    otherwise. The last stage reads to the end. Returns every ``id`` read.
    """
    seen: list[int] = []
    offsets: list[Any] | None = None
    for stage, parallelism in enumerate(parallelisms):
        last = stage == len(parallelisms) - 1
        new_offsets = []
        for subtask in range(parallelism):
            ctx = SourceContext("src_0", subtask, parallelism)
            if offsets is None:
                resume = None
            elif len(offsets) == parallelism:
                resume = offsets[subtask]
            else:
                resume = RescaledOffsets(tuple(offsets))
            reader = source.build(ctx, resume)
            budget = None if last else reads[stage][subtask % len(reads[stage])]
            while budget is None or budget > 0:
                batch = reader.read()
                if batch is None:
                    break
                assert isinstance(batch, pa.RecordBatch)
                seen += batch.column("id").to_pylist()
                budget = None if budget is None else budget - 1
            new_offsets.append(msgpack.unpackb(msgpack.packb(reader.offset())))
            reader.close()
        offsets = new_offsets
    return seen


rescales = given(
    parallelisms=st.lists(st.integers(1, 5), min_size=2, max_size=4),
    reads=st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=5), min_size=3, max_size=3),
)


def assert_exactly_once(make: Callable[[], Source], expected: list[int], parallelisms: list[int],
                        reads: list[list[int]]) -> None:
    seen = read_across_rescales(make(), parallelisms, reads)
    twice = sorted(i for i, count in collections.Counter(seen).items() if count > 1)
    assert sorted(seen) == expected, f"missing {sorted(set(expected) - set(seen))}, read twice {twice}"


def test_readers_at_the_same_parallelism_deal_their_own_cursors_back() -> None:
    cursors = [SplitCursor(6, 5, 11), SplitCursor(6, 8, 14), SplitCursor(6, 6, 6), SplitCursor(6, 9, 15),
               SplitCursor(6, 7, 13), SplitCursor(6, 10, 10)]
    dealt = [deal_cursors(cursors, subtask, 3) for subtask in range(3)]
    again = [deal_cursors([c for share in dealt for c in share], subtask, 3) for subtask in range(3)]
    assert again == dealt
    assert all(len(share) == 2 for share in dealt)
    assert len([c for s in range(2) for c in deal_cursors(cursors, s, 2)]) == 6  # 6 divides by 2: no split


# -- real Ray: resume at another parallelism, resume after the graph changed -------------------------------

KEYS = 16


def keyed_rows(offset: int, n: int) -> pa.RecordBatch:
    """Rows ``offset .. offset + n - 1``: key ``i % 16``, one count each."""
    ids = list(range(offset, offset + n))
    return pa.record_batch({"k": [i % KEYS for i in ids], "n": [1] * n})


def add_counts(acc: dict, row: dict) -> dict:
    return {"k": row["k"], "n": acc["n"] + row["n"]}


def counting_flow(job: str, total: int, sink: of.sinks.TransactionalSink) -> of.Dataflow:
    """A keyed running count: every row emits its key's count so far (``reduce`` state per key)."""
    flow = of.Dataflow(job)
    events = flow.source(of.sources.GeneratorSource(keyed_rows, total=total, batch_size=100, max_events_per_s=2_000))
    events.key_by("k").reduce(add_counts).sink(sink)
    return flow


def completed(storage: str, job: str) -> int:
    ids = CheckpointStorage(storage, job).completed_ids()
    return ids[-1] if ids else 0


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize(("before", "after"), [(2, 3), (3, 2)])
def test_resume_at_another_parallelism_keeps_every_keys_state(tmp_path: Path, before: int, after: int) -> None:
    """Stop a keyed job mid-stream, resume it at another parallelism: the output equals one uninterrupted run."""
    total, job, storage = 8_000, f"rescale-{before}-{after}", str(tmp_path / "chk")
    sink = of.sinks.TestingSink()
    config = of.CheckpointConfig(interval_s=0.2, storage=storage)
    handle = of.submit(counting_flow(job, total, sink), parallelism=before, checkpoint=config)
    wait_until(lambda: completed(storage, job) >= 1, what="a checkpoint")
    handle.stop(timeout_s=120)
    first = len(sink.rows())
    result = of.run(counting_flow(job, total, sink), parallelism=after, checkpoint=config, resume=True,
                    timeout_s=120)
    assert result.metrics["restored_from"] and 0 < first < total, (first, result.metrics["restored_from"])
    got = collections.Counter((row["k"], row["n"]) for row in sink.rows())
    expected = collections.Counter((k, n) for k in range(KEYS) for n in range(1, len(range(k, total, KEYS)) + 1))
    assert got == expected, f"missing {expected - got}, extra {got - expected}"


def timed_rows(offset: int, n: int) -> pa.RecordBatch:
    ids = list(range(offset, offset + n))
    return pa.record_batch({"k": [i % 4 for i in ids], "t": ids})


class FailAfterACheckpoint(of.sources.Source):
    """Wraps a source; when ``armed``, its reader raises once a checkpoint of ``job`` completed."""

    def __init__(self, inner: of.sources.Source, storage: str, job: str, *, armed: bool) -> None:
        self.inner, self.storage, self.job, self.armed = inner, storage, job, armed

    def build(self, ctx, resume_offset=None) -> of.sources.SourceReader:
        return _FailingReader(self.inner.build(ctx, resume_offset), CheckpointStorage(self.storage, self.job),
                              self.armed)


class _FailingReader(of.sources.SourceReader):
    def __init__(self, inner: of.sources.SourceReader, storage: CheckpointStorage, armed: bool) -> None:
        self._inner, self._storage, self._armed = inner, storage, armed

    def read(self):
        if self._armed and self._storage.completed_ids():
            raise RuntimeError("injected failure after a checkpoint")
        return self._inner.read()

    def offset(self):
        return self._inner.offset()

    def close(self) -> None:
        self._inner.close()


def window_flow(job: str, storage: str, sink: of.sinks.TransactionalSink, *, total: int, armed: bool,
                insert_map: bool, window_name: str | None) -> of.Dataflow:
    flow = of.Dataflow(job)
    generator = of.sources.GeneratorSource(timed_rows, total=total, batch_size=100, max_events_per_s=2_000)
    events = flow.source(FailAfterACheckpoint(generator, storage, job, armed=armed),
                         watermark=of.BoundedOutOfOrderness("t"))
    if insert_map:
        events = events.map_batches(lambda batch: batch)
    (events.key_by("k").window(of.windows.Tumbling(size_ms=1_000))
     .aggregate(n=of.agg.count(), name=window_name).sink(sink))
    return flow


def fail_midstream(job: str, storage: str, sink: of.sinks.TransactionalSink, total: int,
                   window_name: str | None) -> None:
    """Run the window job until it fails after its first checkpoint (no restarts): it leaves window state behind."""
    flow = window_flow(job, storage, sink, total=total, armed=True, insert_map=False, window_name=window_name)
    with pytest.raises(of.JobFailedError, match="injected failure"):
        of.run(flow, checkpoint=of.CheckpointConfig(interval_s=0.2, storage=storage),
               restart=of.RestartStrategy.no_restart(), timeout_s=120)


@pytest.mark.usefixtures("ray_session")
def test_resuming_after_a_step_was_inserted_before_an_unnamed_window_is_refused(tmp_path: Path) -> None:
    """The window's identity derives from its upstream steps: its state matches nothing, and the job says so."""
    total, job, storage = 6_000, "identity-unnamed", str(tmp_path / "chk")
    sink = of.sinks.TestingSink()
    fail_midstream(job, storage, sink, total, window_name=None)
    changed = window_flow(job, storage, sink, total=total, armed=False, insert_map=True, window_name=None)
    with pytest.raises(of.PlanError, match=r"(?s)window~.*'window_2/0'.*allow_non_restored_state=True") as info:
        of.run(changed, checkpoint=of.CheckpointConfig(interval_s=0.2, storage=storage), resume=True,
               timeout_s=120)
    assert "source~" not in str(info.value)  # the source's identity did not change
    result = of.run(changed, checkpoint=of.CheckpointConfig(interval_s=0.2, storage=storage), resume=True,
                    allow_non_restored_state=True, timeout_s=120)
    assert result.metrics["restored_from"]  # the source's offsets were restored; the window's state was dropped


@pytest.mark.usefixtures("ray_session")
def test_resuming_after_a_step_was_inserted_before_a_named_window_restores_it(tmp_path: Path) -> None:
    """``name=`` pins the window's state: the resumed job's output equals one uninterrupted run."""
    total, job, storage = 6_000, "identity-named", str(tmp_path / "chk")
    sink = of.sinks.TestingSink()
    fail_midstream(job, storage, sink, total, window_name="counts")
    changed = window_flow(job, storage, sink, total=total, armed=False, insert_map=True, window_name="counts")
    result = of.run(changed, checkpoint=of.CheckpointConfig(interval_s=0.2, storage=storage), resume=True,
                    timeout_s=120)
    assert result.metrics["restored_from"]
    got = collections.Counter((r["k"], r["window_start"], r["n"]) for r in sink.rows())
    counts = collections.Counter((i % 4, i // 1_000 * 1_000) for i in range(total))
    assert got == collections.Counter((k, start, n) for (k, start), n in counts.items())
