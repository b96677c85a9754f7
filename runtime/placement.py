"""Where a job's actors run on a Ray cluster: spread, packed, or pinned to nodes (sans-IO).

``of.run(flow, placement=...)`` chooses, at every deployment (the first and
each restart), a node for every subtask and for the checkpoint coordinator:

- ``"spread"`` (the default): the subtasks go round-robin over the alive
  nodes, each operator's subtasks spread and the total balanced, as Ray's
  ``SPREAD`` strategy and Flink's ``cluster.evenly-spread-out-slots`` do.
- ``"pack"``: every subtask on one node (cheapest channels: the object store
  is shared), the coordinator on another when there is one.
- a mapping ``{operator name: node id or [node ids]}`` pins the subtasks of
  those operators (subtask *i* to the *i*-th id, round-robin); the other
  operators are spread. Node ids are Ray's (``ray.nodes()``,
  ``ray.get_runtime_context().get_node_id()``). An operator named in the
  mapping may be any operator of a chained vertex.

Every choice is a node affinity (``NodeAffinitySchedulingStrategy``) to a
node alive when the attempt deploys: after a node is lost, the restart
places every subtask on the remaining nodes, one pinned to the lost node
included (with a warning). A node that dies between the choice and the
actor's start fails that deployment, which is one failure for the restart
strategy like any other: the next attempt is planned on the nodes left.
The subtasks ask for no CPU by default; when ``actor_options`` asks for
resources (``num_cpus``, ``num_gpus``, ``memory``, ``resources``),
spreading and packing skip the nodes without room for one more (by their
total resources), and a subtask that fits nowhere is left to Ray's
scheduler. A pinned node must have room, or the actor waits for it.

A node that dies without a word (its raylet killed, the machine gone) is
still listed alive for a while (until Ray's health checks give up on it), and
an actor placed there then never starts. So when an attempt fails, the nodes
on which none of its subtasks answered any more (:func:`silent_nodes`: a lost
node takes all of its actors; a killed actor leaves its neighbours) are left
out of the next attempt, as long as another node is left.

The coordinator is placed apart from the subtasks as far as the cluster
allows: on the node with the fewest subtasks, the driver's node first among
equals. It owns the object-store copies of every snapshot (``ray.put(...,
_owner=coordinator)``): a node lost with the coordinator on it loses the
coordinator's in-flight checkpoint and every cached snapshot of the job,
wherever those copies live, and a node lost with subtasks on it loses the
copies those subtasks stored there. Kept apart, one lost node costs one of
the two, never both, and the job restores whatever is left from memory. The
driver's node is preferred because losing it ends the job anyway (the
driver runs there), so the coordinator adds no failure there; spreading
fills that node last, so it is the one with the fewest subtasks. A
coordinator that survived a restart stays where it is, and that node is
filled last instead. (Where ``ray.put`` takes no owner, from Ray 2.56 on,
no object-store copy is made; apart still means that losing subtasks does
not also cost the coordinator and its in-flight checkpoint.)

Example:
    >>> decision = decide_placement("spread", [(("src",), "src/0"), (("src",), "src/1"), (("win",), "win/0")],
    ...                             nodes=["a", "b", "c"], driver="a")
    >>> decision.subtasks
    {'src/0': 'b', 'src/1': 'c', 'win/0': 'a'}
    >>> decision.coordinator
    'a'
    >>> decide_placement("pack", [(("src",), "src/0"), (("win",), "win/0")], nodes=["a", "b"], driver="a").subtasks
    {'src/0': 'b', 'win/0': 'b'}

"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

from onceflow.errors import PlanError

__all__ = ["PLACEMENTS", "Placement", "PlacementDecision", "check_pinned_operators", "check_placement",
           "decide_placement", "describe_placement", "room_on", "silent_nodes"]

Placement: TypeAlias = str | Mapping[str, str | Sequence[str]]
"""``"spread"``, ``"pack"``, or ``{operator name: node id or [node ids]}`` (see the module)."""

PLACEMENTS = ("spread", "pack")
"""The named placements; a mapping pins operators instead."""


def check_placement(placement: object) -> str | dict[str, tuple[str, ...]]:
    """The placement in its stored form: a name, or operator -> node ids (a tuple, even for one).

    Raises:
        PlanError: not one of :data:`PLACEMENTS` nor a mapping of operator names to node ids.
    """
    if isinstance(placement, str):
        if placement not in PLACEMENTS:
            msg = (f"placement must be one of {', '.join(map(repr, PLACEMENTS))} or a mapping of operator names to "
                   f"node ids, got {placement!r}; pass placement='spread' (the default) or 'pack'")
            raise PlanError(msg)
        return placement
    if not isinstance(placement, Mapping):
        msg = (f"placement must be 'spread', 'pack' or a mapping of operator names to node ids, got {placement!r}; "
               "pass placement={'window_2': ray.get_runtime_context().get_node_id()}")
        raise PlanError(msg)
    pinned: dict[str, tuple[str, ...]] = {}
    for operator, nodes in placement.items():
        ids = (nodes,) if isinstance(nodes, str) else tuple(nodes) if isinstance(nodes, Sequence) else ()
        if not isinstance(operator, str) or not ids or not all(isinstance(n, str) and n for n in ids):
            msg = (f"placement pins operator {operator!r} to {nodes!r}, which is not a node id nor a list of them; "
                   "pass {'<operator name>': '<node id>'} or {'<operator name>': ['<node id>', ...]}")
            raise PlanError(msg)
        pinned[operator] = ids
    return pinned


def check_pinned_operators(placement: str | Mapping[str, Sequence[str]], vertices: Mapping[str, Sequence[str]]) -> None:
    """Refuse a pin that names no operator of the plan (``vertices``: vertex name -> its operators' names).

    Raises:
        PlanError: an operator named in ``placement`` is not in the dataflow.
    """
    if isinstance(placement, str):
        return
    known = {name for operators in vertices.values() for name in operators}
    unknown = sorted(set(placement) - known)
    if unknown:
        msg = (f"placement pins operator(s) {', '.join(map(repr, unknown))}, which the dataflow does not have; "
               f"pin one of {', '.join(map(repr, sorted(known)))}")
        raise PlanError(msg)


@dataclass(frozen=True, slots=True)
class PlacementDecision:
    """Where one attempt's actors should run.

    Attributes:
        subtasks: task (``<vertex>/<subtask>``) -> the node id it is asked for
            (empty off Ray: the local executor has no nodes).
        coordinator: the node id for a coordinator started with this attempt
            (``""``: anywhere).
        warnings: pins that could not be honoured (their node is not alive), for the log.
    """

    subtasks: dict[str, str] = field(default_factory=dict)
    coordinator: str = ""
    warnings: tuple[str, ...] = ()

    def load(self, node: str) -> int:
        """How many subtasks are asked for ``node``."""
        return sum(1 for n in self.subtasks.values() if n == node)


def room_on(totals: Mapping[str, float], demand: Mapping[str, float]) -> int | None:
    """How many actors asking for ``demand`` (resource -> amount) a node with ``totals`` holds (``None``: any number).

    Example:
        >>> room_on({"CPU": 4.0, "GPU": 1.0}, {"CPU": 1.0}), room_on({"CPU": 0.0}, {"CPU": 1.0})
        (4, 0)
        >>> room_on({"CPU": 1.0}, {}) is None
        True
    """
    wanted = {key: amount for key, amount in demand.items() if amount > 0}
    if not wanted:
        return None
    return min(int(totals.get(key, 0.0) / amount + 1e-9) for key, amount in wanted.items())


def decide_placement(placement: str | Mapping[str, Sequence[str]], tasks: Sequence[tuple[tuple[str, ...], str]], *,
                     nodes: Sequence[str], driver: str = "", coordinator: str = "",
                     room: Mapping[str, int | None] | None = None) -> PlacementDecision:
    """Choose a node for every task and for the coordinator (see the module for the rules).

    Args:
        placement: ``"spread"``, ``"pack"``, or operator name -> node ids
            (a vertex is pinned by the first of its operators the mapping names).
        tasks: ``(operator names of the task's vertex, upstream first, task)``
            per subtask, in plan order.
        nodes: the alive node ids.
        driver: the driver's node id (``""``: unknown).
        coordinator: the node of a coordinator that survives from an earlier attempt (``""``: none).
        room: per node, how many actors it can hold (:func:`room_on`; ``None`` or absent:
            any number). Spreading and packing skip a full node; a task no node
            has room for is left to Ray (``""``). A pin is honoured regardless.

    Returns:
        The decision; empty when there are no nodes.
    """
    if not nodes:
        return PlacementDecision()
    left = {n: r for n, r in (room or {}).items() if r is not None}
    alive = sorted(set(nodes))
    anchor = next((n for n in (coordinator, driver) if n in alive), alive[-1])
    order = [n for n in alive if n != anchor] + [anchor]  # the anchor is filled last

    def fits(node: str) -> bool:
        return left.get(node, 1) > 0

    def take(node: str) -> str:
        if node in left:
            left[node] -= 1
        return node

    chosen: dict[str, str] = {}
    warnings: list[str] = []
    spread = 0
    pins = placement if not isinstance(placement, str) else {}
    by_vertex: dict[tuple[str, ...], int] = {}
    for operators, task in tasks:
        index = by_vertex.get(operators, 0)
        by_vertex[operators] = index + 1
        pinned = next((pins[name] for name in operators if name in pins), None)
        if pinned is not None:
            node = pinned[index % len(pinned)]
            if node in alive:
                chosen[task] = take(node)
                continue
            warnings.append(f"{task} is pinned to node {node}, which is not alive; placing it on another node")
        if placement == "pack":
            chosen[task] = next((take(n) for n in order if fits(n)), "")
            continue
        candidates = [(spread + k) % len(order) for k in range(len(order))]
        position = next((i for i in candidates if fits(order[i])), None)
        if position is None:
            chosen[task] = ""
            continue
        chosen[task] = take(order[position])
        spread = position + 1
    if coordinator in alive:
        home = coordinator
    else:
        preference = [n for n in [*(n for n in (driver,) if n in alive), *order] if fits(n)]
        home = min(preference, key=lambda n: sum(1 for c in chosen.values() if c == n), default="")
    return PlacementDecision(chosen, home, tuple(warnings))


def describe_placement(placement: Mapping[str, str]) -> str:
    """One line per node: its id and the actors on it (``placement``: actor -> node id), busiest node first.

    Example:
        >>> print(describe_placement({"coordinator": "n1", "src/0": "n2", "src/1": "n1", "win/0": "n2"}))
        node n1: coordinator, src/1
        node n2: src/0, win/0
    """
    by_node: dict[str, list[str]] = {}
    for actor, node in placement.items():
        by_node.setdefault(node, []).append(actor)
    ordered = sorted(by_node.items(), key=lambda item: (-len(item[1]), item[0]))
    return "\n".join(f"node {node or '(this process)'}: {', '.join(sorted(actors))}" for node, actors in ordered)


def silent_nodes(placement: Mapping[str, str], answered: Collection[str]) -> set[str]:
    """The nodes on which no task of ``placement`` (task -> node) is among ``answered``: lost, most likely.

    Example:
        >>> sorted(silent_nodes({"a/0": "n1", "a/1": "n2", "b/0": "n2"}, answered={"a/0", "b/0"}))
        []
        >>> sorted(silent_nodes({"a/0": "n1", "a/1": "n2", "b/0": "n2"}, answered={"a/0"}))
        ['n2']
    """
    nodes = {node for node in placement.values() if node}
    return {node for node in nodes if not any(placement[t] == node for t in answered if t in placement)}
