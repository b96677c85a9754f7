"""Mapping a checkpoint's state onto a plan: rescaling and operator identity (sans-IO).

A restore point holds, per old subtask (``"<vertex>/<subtask>"``), a handle to
each operator's state, keyed by the operator's uid (:attr:`Node.uid
<onceflow.runtime.dataflow.Node>`). :func:`assign_restored_state` decides which handles
every subtask of a new plan restores from, at any parallelism and any
chaining, as Flink does when it restores a savepoint:

- **keyed operators** (``node.keyed``): a new subtask gets the state of every
  old subtask whose key-group range overlaps its own; the operator keeps only
  the rows of its own key groups.
- **sources**: every new subtask gets every old reader's offset, in old subtask
  order. At an unchanged parallelism a subtask resumes from its own; at another
  one the readers deal the old splits among themselves
  (:class:`~onceflow.operators.sources.base.RescaledOffsets`).
- **sinks**: a sink stage starts with no restored transactions: the job
  resolves every restored transaction before the attempt deploys (see
  :func:`restored_sink_states`). A sink's state still counts as matched.
- **other operators** (state that cannot be split by key): old subtask *i*'s
  state goes to new subtask ``i % parallelism``, so each piece is restored once.
- **runtime entries** (keys starting with ``@``) belong to the subtask, not to
  an operator: a vertex that keeps its name and parallelism gets its own back;
  otherwise every new subtask of the vertex of that name gets all of them.

State whose uid matches no operator of the new plan is refused with a
:class:`~onceflow.errors.PlanError` naming it, unless the caller allows
dropping it (Flink's ``allowNonRestoredState``).

Example:
    >>> from onceflow.testing.source import TestingSource
    >>> from onceflow.testing.sink import TestingSink
    >>> from onceflow.runtime.dataflow import Dataflow
    >>> from onceflow.runtime.plan import plan
    >>> flow = Dataflow("doc")
    >>> flow.source(TestingSource([]), name="events").sink(TestingSink(), name="out")
    >>> old = {"events/0": {"events": "offsets", "out": "transactions", "@input_watermarks": "w"}}
    >>> assign_restored_state(plan(flow), old)
    {'events/0': {'events': ['offsets'], '@input_watermarks': ['w']}}

"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from onceflow.errors import PlanError
from onceflow.operators.keygroups import key_group_range
from onceflow.runtime.dataflow import NodeKind

if TYPE_CHECKING:
    from onceflow.runtime.dataflow import Node
    from onceflow.runtime.plan import PhysicalPlan, VertexSpec

__all__ = ["RUNTIME_PREFIX", "assign_restored_state", "restored_sink_states"]

log = logging.getLogger("onceflow")

RUNTIME_PREFIX = "@"
"""State keys starting with this belong to the subtask's runtime (input watermarks), not to an operator."""

H = TypeVar("H")
"""A state handle (``onceflow.runtime.deployment.RestoredState``); this module never looks inside one."""


@dataclass(frozen=True, slots=True)
class _OldState(Generic[H]):
    """One state handle of the restore point, with where it came from."""

    vertex: str
    subtask: int
    parallelism: int
    handle: H


def _parse_task(task: str) -> tuple[str, int]:
    vertex, _, subtask = task.rpartition("/")
    if not vertex or not subtask.isdigit():
        msg = f"checkpointed task {task!r} is not '<operator>/<subtask>'; restore from a checkpoint of onceflow"
        raise PlanError(msg)
    return vertex, int(subtask)


def _old_states(states: Mapping[str, Mapping[str, H]]) -> tuple[dict[str, list[_OldState[H]]],
                                                               dict[tuple[str, str], list[_OldState[H]]]]:
    """Group the restore point by operator uid and, for runtime entries, by (vertex, key); old subtask order."""
    tasks = {task: _parse_task(task) for task in states}
    parallelism: dict[str, int] = {}
    for vertex, subtask in tasks.values():
        parallelism[vertex] = max(parallelism.get(vertex, 0), subtask + 1)
    by_uid: dict[str, list[_OldState[H]]] = {}
    runtime: dict[tuple[str, str], list[_OldState[H]]] = {}
    for task in sorted(states, key=lambda t: tasks[t]):
        vertex, subtask = tasks[task]
        for key, handle in states[task].items():
            entry = _OldState(vertex, subtask, parallelism[vertex], handle)
            if key.startswith(RUNTIME_PREFIX):
                runtime.setdefault((vertex, key), []).append(entry)
            else:
                by_uid.setdefault(key, []).append(entry)
    return by_uid, runtime


def _refuse_or_drop(unmatched: dict[str, list[_OldState[H]]], *, allow_non_restored_state: bool) -> None:
    described = "; ".join(
        f"operator {uid!r} (in task{'s' if len(entries) > 1 else ''} "
        f"{', '.join(repr(f'{e.vertex}/{e.subtask}') for e in entries)})"
        for uid, entries in sorted(unmatched.items())
    )
    if not allow_non_restored_state:
        msg = (
            f"the checkpoint holds state that matches no operator of this dataflow: {described}. "
            "State is matched by operator uid: the name= given to the operator, or an id derived from the "
            "steps upstream of it when it has no name. Give the operator back its name (or its upstream steps), "
            "or pass allow_non_restored_state=True to drop this state"
        )
        raise PlanError(msg)
    log.warning("dropping checkpointed state that matches no operator of this dataflow "
                "(allow_non_restored_state=True): %s", described)


def _keyed_share(entries: list[_OldState[H]], subtask: int, parallelism: int, max_parallelism: int) -> list[H]:
    mine = key_group_range(subtask, parallelism, max_parallelism)
    shared = []
    for entry in entries:
        theirs = key_group_range(entry.subtask, entry.parallelism, max_parallelism)
        if theirs.start < mine.stop and mine.start < theirs.stop:
            shared.append(entry.handle)
    return shared


def _node_share(node: Node, entries: list[_OldState[H]], vertex: VertexSpec, subtask: int,
                max_parallelism: int) -> list[H]:
    if node.kind is NodeKind.SOURCE:
        return [e.handle for e in entries]
    if node.kind is NodeKind.SINK:
        return []
    if node.keyed:
        return _keyed_share(entries, subtask, vertex.parallelism, max_parallelism)
    return [e.handle for e in entries if e.subtask % vertex.parallelism == subtask]


def assign_restored_state(plan: PhysicalPlan, states: Mapping[str, Mapping[str, H]], *,
                          allow_non_restored_state: bool = False) -> dict[str, dict[str, list[H]]]:
    """Decide which checkpointed state every subtask of ``plan`` restores from.

    Args:
        plan: the new physical plan.
        states: the restore point: old task ``"<vertex>/<subtask>"`` -> state
            key (an operator uid, or a runtime entry starting with ``@``) -> handle.
        allow_non_restored_state: drop (with a warning) state whose uid matches
            no operator of ``plan``, instead of refusing to start.

    Returns:
        New task ``"<vertex>/<subtask>"`` -> state key -> the handles to
        restore from (sources: every old reader's, in old subtask order; keyed
        operators: those overlapping the subtask's key groups). Every task of
        the plan has an entry; keys without handles are left out.

    Raises:
        PlanError: some state matches no operator (the message names each one)
            and ``allow_non_restored_state`` is false, or a task name is malformed.

    """
    by_uid, runtime = _old_states(states)
    nodes = {node.uid: node for vertex in plan.vertices for node in vertex.nodes}
    unmatched = {uid: entries for uid, entries in by_uid.items() if uid not in nodes}
    if unmatched:
        _refuse_or_drop(unmatched, allow_non_restored_state=allow_non_restored_state)
    assigned: dict[str, dict[str, list[H]]] = {}
    for vertex in plan.vertices:
        for subtask in range(vertex.parallelism):
            task: dict[str, list[H]] = {}
            for node in vertex.nodes:
                share = _node_share(node, by_uid.get(node.uid, []), vertex, subtask, plan.max_parallelism)
                if share:
                    task[node.uid] = share
            for (old_vertex, key), entries in runtime.items():
                if old_vertex != vertex.name:
                    continue
                if entries[0].parallelism == vertex.parallelism:
                    own = [e.handle for e in entries if e.subtask == subtask]
                else:
                    own = [e.handle for e in entries]
                if own:
                    task[key] = own
            assigned[f"{vertex.name}/{subtask}"] = task
    return assigned


def restored_sink_states(plan: PhysicalPlan, states: Mapping[str, Mapping[str, H]]) -> dict[str, list[H]]:
    """Return, per sink uid of ``plan``, the state handles of every old subtask of that sink (old subtask order).

    The job resolves these transactions (commit those of the restored
    checkpoint, abort the rest) once, before the attempt deploys; state of
    sinks that are no longer in ``plan`` is left to
    :func:`assign_restored_state`'s refusal (or to dropping).
    """
    by_uid, _ = _old_states(states)
    sinks = [node.uid for vertex in plan.vertices for node in vertex.nodes if node.kind is NodeKind.SINK]
    return {uid: [e.handle for e in by_uid[uid]] for uid in sinks if uid in by_uid}
