"""Planning: from the logical dataflow to vertices (operator chains) and channels.

Chaining follows Flink: a node is fused into its input's actor when it has a
single input that is routed forward (no ``key_by``, same parallelism, main
port) and that input feeds nothing else. A ``map -> filter -> map`` after a
source then costs no extra hop. Every other edge becomes channels: *forward*
(subtask ``i`` to subtask ``i``), *hash* (by key group) or *rebalance*
(round-robin batches), and every channel has its own index at the receiver.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from onceflow.errors import PlanError
from onceflow.operators.keygroups import DEFAULT_MAX_PARALLELISM
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

    """

    id: int
    name: str
    nodes: list[Node]
    parallelism: int
    input_channels: int = 0
    outputs: list[OutputSpec] = field(default_factory=list)

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

    def describe(self) -> str:
        """A readable one-line-per-vertex description of the plan."""
        lines = []
        for v in self.vertices:
            outs = ", ".join(f"{self.vertices[o.target].name}({o.routing.value})" for o in v.outputs)
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
        PlanError: the graph has no sink, or a parallelism is out of range.

    """
    if parallelism < 1:
        msg = f"parallelism must be >= 1, got {parallelism}"
        raise PlanError(msg)
    if not any(n.kind is NodeKind.SINK for n in flow.nodes):
        msg = f"dataflow {flow.name!r} has no sink, so it would compute nothing visible; add stream.sink(...)"
        raise PlanError(msg)
    resolved: dict[int, int] = {}
    for node in flow.nodes:
        resolved[node.id] = _parallelism(node, flow, resolved, parallelism, max_parallelism)

    consumers: dict[int, int] = {}
    for node in flow.nodes:
        for edge in node.inputs:
            consumers[edge.node] = consumers.get(edge.node, 0) + 1

    vertex_of: dict[int, int] = {}
    vertices: list[VertexSpec] = []
    for node in flow.nodes:
        if chaining and len(node.inputs) == 1:
            edge = node.inputs[0]
            if (edge.keys is None and edge.port == 0 and consumers[edge.node] == 1
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
                vertex.input_channels += 1 if routing is Routing.FORWARD else upstream.parallelism
    return PhysicalPlan(flow.name, vertices, max_parallelism)
