"""Planning: from the logical dataflow to vertices (operator chains) and channels.

Chaining follows Flink: a node is fused into its input's actor when it has a
single input that is routed forward (no ``key_by``, same parallelism, main
port) and that output port feeds nothing else (a consumer of a side output,
such as ``late_events()`` or ``dead_letters()``, does not count: its rows leave
the chain at that port). A ``map -> filter -> map`` after a source then costs
no extra hop. Every other edge becomes channels: *forward*
(subtask ``i`` to subtask ``i``), *hash* (by key group) or *rebalance*
(round-robin batches), and every channel has its own index at the receiver.

Loops: a loop head's feedback edge (``close_with``) becomes its last input
channels (:attr:`VertexSpec.feedback_channels`), and every vertex on a cycle
gets the index of its loop (:attr:`VertexSpec.loop`): the vertices of one
strongly connected component share it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from onceflow.errors import PlanError
from onceflow.operators.dedupe import Dedupe
from onceflow.operators.keygroups import DEFAULT_MAX_PARALLELISM
from onceflow.operators.stateless import LoopHead
from onceflow.operators.windows import WindowAggregate
from onceflow.runtime.dataflow import Dataflow, Node, NodeKind

__all__ = ["OutputSpec", "PhysicalPlan", "Routing", "VertexSpec", "plan"]


class Routing(Enum):
    """How an edge's rows reach the downstream subtasks."""

    FORWARD = "forward"
    HASH = "hash"
    REBALANCE = "rebalance"


@dataclass(frozen=True, slots=True)
class OutputSpec:
    """One outgoing edge of a vertex.

    Attributes:
        stage: the index, within the vertex's chain, of the node that emits.
        port: that node's output port.
        target: the downstream vertex id.
        routing: forward, hash or rebalance.
        keys: the hash columns (``HASH`` only).
        key_by: the ``key_by`` step's name, for error messages.
        channel_base: the receiver's index of this edge's first channel.

    """

    stage: int
    port: int
    target: int
    routing: Routing
    keys: tuple[str, ...] | None
    key_by: str | None
    channel_base: int


@dataclass(slots=True)
class VertexSpec:
    """A chain of fused operators, run as ``parallelism`` subtask actors.

    Attributes:
        id: the vertex's index in the plan.
        name: the first operator's name; actors are ``<job>/<name>/<subtask>``.
        nodes: the chained operators, upstream first.
        parallelism: the number of subtasks.
        input_channels: channels into each subtask.
        outputs: outgoing edges.
        feedback_channels: of the input channels, how many (the last ones)
            come from a loop's feedback edge (a loop head; 0 otherwise).
        loop: the loop the vertex is on (vertices on one cycle share it), or ``None``.

    """

    id: int
    name: str
    nodes: list[Node]
    parallelism: int
    input_channels: int = 0
    outputs: list[OutputSpec] = field(default_factory=list)
    feedback_channels: int = 0
    loop: int | None = None

    @property
    def is_source(self) -> bool:
        """Whether the chain starts with a source."""
        return self.nodes[0].kind is NodeKind.SOURCE

    @property
    def operators(self) -> list[str]:
        """The names of the chained operators."""
        return [n.name for n in self.nodes]


@dataclass(slots=True)
class PhysicalPlan:
    """Everything the job needs to create and wire its actors."""

    job: str
    vertices: list[VertexSpec]
    max_parallelism: int

    def loop_input_channels(self, vertex_id: int) -> list[int]:
        """The input channels of ``vertex_id``'s subtasks whose senders are on the same loop."""
        vertex = self.vertices[vertex_id]
        channels: list[int] = []
        for upstream in self.vertices:
            if vertex.loop is None or upstream.loop != vertex.loop:
                continue
            for spec in upstream.outputs:
                if spec.target == vertex_id:
                    count = 1 if spec.routing is Routing.FORWARD else upstream.parallelism
                    channels += range(spec.channel_base, spec.channel_base + count)
        return sorted(channels)

    def describe(self) -> str:
        """A readable one-line-per-vertex description of the plan."""
        lines = []
        for v in self.vertices:
            outs = ", ".join(f"{self.vertices[o.target].name}({o.routing.value})" for o in v.outputs)
            outs += f" [loop {v.loop}]" if v.loop is not None else ""
            lines.append(f"{v.name} x{v.parallelism}: {' -> '.join(v.operators)}" + (f" => {outs}" if outs else ""))
        return "\n".join(lines)


def _parallelism(node: Node, flow: Dataflow, resolved: dict[int, int], default: int, max_parallelism: int) -> int:
    if node.kind is NodeKind.SOURCE:
        limit = node.spec.max_parallelism()
        chosen = node.parallelism or (min(default, limit) if limit else default)
        if limit is not None and chosen > limit:
            msg = f"source {node.name!r} can use at most {limit} subtasks, asked for {chosen}; lower its parallelism"
            raise PlanError(msg)
        return chosen
    if node.parallelism is not None:
        chosen = node.parallelism
    elif node.keyed or len(node.inputs) != 1:
        chosen = default
    else:
        chosen = resolved[node.inputs[0].node]
    if node.keyed and chosen > max_parallelism:
        msg = (
            f"operator {node.name!r}: parallelism {chosen} exceeds max_parallelism {max_parallelism} "
            "(the number of key groups); raise max_parallelism"
        )
        raise PlanError(msg)
    return chosen


def plan(flow: Dataflow, parallelism: int = 1, *, max_parallelism: int = DEFAULT_MAX_PARALLELISM,
         chaining: bool = True) -> PhysicalPlan:
    """Turn ``flow`` into a physical plan.

    Args:
        flow: the dataflow.
        parallelism: the default parallelism of sources, keyed operators and unions.
        max_parallelism: the number of key groups.
        chaining: fuse forward-connected operators into one actor.

    Raises:
        PlanError: the graph has no sink, a parallelism is out of range, or a
            loop is not closed or holds an event-time operator.

    """
    if parallelism < 1:
        msg = f"parallelism must be >= 1, got {parallelism}"
        raise PlanError(msg)
    if not any(n.kind is NodeKind.SINK for n in flow.nodes):
        msg = f"dataflow {flow.name!r} has no sink, so it would compute nothing visible; add stream.sink(...)"
        raise PlanError(msg)
    _check_loops(flow)
    resolved: dict[int, int] = {}
    for node in flow.nodes:
        resolved[node.id] = _parallelism(node, flow, resolved, parallelism, max_parallelism)

    consumers: dict[tuple[int, int], int] = {}  # per output port: a side output's consumer does not stop chaining
    for node in flow.nodes:
        for edge in node.inputs:
            consumers[edge.node, edge.port] = consumers.get((edge.node, edge.port), 0) + 1

    vertex_of: dict[int, int] = {}
    vertices: list[VertexSpec] = []
    for node in flow.nodes:
        if chaining and len(node.inputs) == 1:
            edge = node.inputs[0]
            if (edge.keys is None and edge.port == 0 and consumers[edge.node, edge.port] == 1
                    and resolved[edge.node] == resolved[node.id]):
                vertex = vertices[vertex_of[edge.node]]
                vertex.nodes.append(node)
                vertex_of[node.id] = vertex.id
                continue
        vertex_of[node.id] = len(vertices)
        vertices.append(VertexSpec(len(vertices), node.name, [node], resolved[node.id]))

    for vertex in vertices:
        for stage, node in enumerate(vertex.nodes):
            for edge in node.inputs if stage == 0 else ():
                upstream = vertices[vertex_of[edge.node]]
                if edge.keys is not None:
                    routing = Routing.HASH
                elif upstream.parallelism == vertex.parallelism:
                    routing = Routing.FORWARD
                else:
                    routing = Routing.REBALANCE
                upstream_stage = upstream.operators.index(flow.nodes[edge.node].name)
                upstream.outputs.append(OutputSpec(upstream_stage, edge.port, vertex.id, routing, edge.keys,
                                                   edge.key_by, vertex.input_channels))
                channels = 1 if routing is Routing.FORWARD else upstream.parallelism
                vertex.input_channels += channels
                if edge.feedback:  # the feedback edge is the head's last input (close_with appends it)
                    vertex.feedback_channels += channels
    for number, component in enumerate(_cycles(vertices)):
        for vertex_id in component:
            vertices[vertex_id].loop = number
    return PhysicalPlan(flow.name, vertices, max_parallelism)


def _check_loops(flow: Dataflow) -> None:
    """Every loop is closed, and no event-time operator sits in one (a loop holds event time back)."""
    for head in flow.nodes:
        if not isinstance(head.spec, LoopHead):
            continue
        feedback = [edge for edge in head.inputs if edge.feedback]
        if not feedback:
            msg = (f"loop {head.name!r} is never closed: call close_with(feedback) on the stream iterate() "
                   "returned, with the stream that goes round again")
            raise PlanError(msg)
        for node in _body(flow, head.id, feedback[0].node):
            if isinstance(node.spec, WindowAggregate | Dedupe):
                msg = (f"operator {node.name!r} is inside loop {head.name!r}: windows and dedupe need event "
                       "time, which a loop holds back until it ends; move it after the loop (or before it)")
                raise PlanError(msg)


def _body(flow: Dataflow, head: int, tail: int) -> list[Node]:
    """The nodes on a path from ``head`` to ``tail`` (both included)."""
    consumers: dict[int, list[int]] = {}
    for node in flow.nodes:
        for edge in node.inputs:
            if not edge.feedback:
                consumers.setdefault(edge.node, []).append(node.id)

    def closure(start: int, step: dict[int, list[int]]) -> set[int]:
        seen, todo = set(), [start]
        while todo:
            current = todo.pop()
            if current not in seen:
                seen.add(current)
                todo += step.get(current, [])
        return seen

    producers = {n.id: [e.node for e in n.inputs if not e.feedback] for n in flow.nodes}
    inside = closure(head, consumers) & closure(tail, producers)
    return [flow.nodes[i] for i in sorted(inside)]


def _cycles(vertices: list[VertexSpec]) -> list[list[int]]:
    """The vertices of every cycle, one list per strongly connected component (Tarjan's algorithm)."""
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    stack: list[int] = []
    on_stack: set[int] = set()
    found: list[list[int]] = []

    def visit(v: int) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for out in vertices[v].outputs:
            if out.target not in index:
                visit(out.target)
                low[v] = min(low[v], low[out.target])
            elif out.target in on_stack:
                low[v] = min(low[v], index[out.target])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or any(o.target == v for o in vertices[v].outputs):
                found.append(sorted(component))

    for vertex in vertices:
        if vertex.id not in index:
            visit(vertex.id)
    return sorted(found)
