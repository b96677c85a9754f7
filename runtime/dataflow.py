"""The dataflow graph users build: ``Dataflow``, ``Stream`` and friends.

These classes only record a graph of small picklable configuration objects;
:mod:`onceflow.runtime.plan` turns it into subtask actors and channels, and
:func:`onceflow.runtime.job.run` executes it.

Example:
    >>> import pyarrow as pa
    >>> from onceflow.testing.source import TestingSource
    >>> from onceflow.testing.sink import TestingSink
    >>> from onceflow.operators.watermark import BoundedOutOfOrderness
    >>> from onceflow.operators import agg
    >>> from onceflow.operators.windows import Tumbling
    >>> flow = Dataflow("doc")
    >>> events = flow.source(TestingSource([{"user": 1, "t": 5}]),
    ...                      watermark=BoundedOutOfOrderness("t"))
    >>> counts = events.key_by("user").window(Tumbling(size_ms=10)).aggregate(n=agg.count())
    >>> counts.sink(TestingSink())
    >>> [node.name for node in flow.nodes]
    ['source_0', 'window_2', 'sink_3']
    >>> [node.uid.split("~")[0] for node in flow.nodes]
    ['source', 'window', 'sink']

Operator identity: every node has a readable ``name`` (actor names, logs,
errors) and a stable ``uid`` that checkpointed state is matched by. The uid is
the explicit ``name=`` when one is given; otherwise it is derived from the
graph's structure (the step's kind, its config's class, its inputs' uids and
key columns, as Flink's operator hash), so it stays the same when unrelated
steps are added elsewhere, but changes when a step is inserted upstream of it.
Give ``name=`` to every stateful operator whose state must survive changes to
the graph.

"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from onceflow.checkpoint.two_phase_commit import TransactionalSink
from onceflow.errors import PlanError
from onceflow.operators.dedupe import Dedupe, DedupeMode
from onceflow.operators.keyed import KeyedProcess, KeyedReduce, ProcessFn, ReduceFn
from onceflow.operators.logic import DEAD_LETTERS, LATE, MAIN
from onceflow.operators.sources.base import Source
from onceflow.operators.stateless import Filter, FlatMap, Forward, LoopHead, Map, MapBatches, Row
from onceflow.operators.watermark import BoundedOutOfOrderness
from onceflow.operators.windows import WindowAggregate

if TYPE_CHECKING:
    import pyarrow as pa

    from onceflow.operators.agg import Aggregation
    from onceflow.operators.windows import Session, Sliding, Tumbling

__all__ = [
    "Dataflow",
    "Edge",
    "IterativeStream",
    "KeyedStream",
    "Node",
    "NodeKind",
    "SourceStream",
    "Stream",
    "WindowedStream",
]

_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
_UID_SEPARATOR = "~"
"""Separates a derived uid's kind from its digest; names cannot contain it, so a derived uid never equals a name."""


class NodeKind(Enum):
    """What a node of the graph does; the runtime executes each kind differently."""

    SOURCE = "source"
    TRANSFORM = "transform"
    SINK = "sink"


@dataclass(frozen=True, slots=True)
class Edge:
    """An input of a node: the upstream node, its output port, and how rows are routed.

    Attributes:
        node: the upstream node's id.
        port: the upstream output port (:data:`MAIN` or a side output).
        keys: hash-partition by these columns (``key_by``); ``None`` routes
            forward when the parallelism matches and round-robin otherwise.
        key_by: the ``key_by`` step's name, for error messages.
        feedback: the edge closes a loop (:meth:`IterativeStream.close_with`): it
            goes back to the loop's head, against the flow of the graph.

    """

    node: int
    port: int = MAIN
    keys: tuple[str, ...] | None = None
    key_by: str | None = None
    feedback: bool = False


@dataclass(slots=True)
class Node:
    """One logical operator.

    Attributes:
        id: the node's index in :attr:`Dataflow.nodes`.
        name: unique, readable name (``map_1``), used in actor names and errors.
        uid: the stable identity that checkpointed state is matched by: the
            explicit ``name=``, or ``<kind>~<digest>`` derived from the graph's
            structure upstream of the node (see the module docstring).
        kind: source, transform or sink.
        spec: the picklable config (a ``Source``, an object with ``build(ctx)``,
            or a ``TransactionalSink``).
        inputs: the node's input edges.
        parallelism: fixed by the user, or ``None`` for the default.
        keyed: whether the node needs a keyed (hash-partitioned) input.
        watermark: a source's watermark strategy.

    """

    id: int
    name: str
    kind: NodeKind
    spec: Any
    inputs: list[Edge] = field(default_factory=list)
    parallelism: int | None = None
    keyed: bool = False
    watermark: BoundedOutOfOrderness | None = None
    uid: str = ""


class Dataflow:
    """A named graph of sources, operators and sinks.

    Every step takes an optional ``name=``: it names the step's actors and
    errors, and pins the step's checkpointed state, which a resumed job
    matches by it. Unnamed steps get readable default names (``map_1``) and a
    uid derived from the graph upstream of them, so inserting a step before a
    stateful operator changes its identity: name stateful operators whose
    state must survive such changes.

    Args:
        name: the job name; subtask actors are named ``<name>/<operator>/<subtask>``.

    """

    def __init__(self, name: str) -> None:
        if not _NAME.match(name):
            msg = f"dataflow name {name!r} must be letters, digits, '_', '.' or '-'; pick another name"
            raise PlanError(msg)
        self.name = name
        self.nodes: list[Node] = []
        self._names: set[str] = set()
        self._steps = 0
        self._signatures: dict[str, int] = {}

    def _name(self, requested: str | None, kind: str) -> str:
        name = requested if requested is not None else f"{kind}_{self._steps}"
        self._steps += 1
        if not _NAME.match(name):
            msg = f"operator name {name!r} must be letters, digits, '_', '.' or '-'; pick another name"
            raise PlanError(msg)
        if name in self._names:
            msg = f"operator name {name!r} is used twice in dataflow {self.name!r}; names must be unique"
            raise PlanError(msg)
        self._names.add(name)
        return name

    def _uid(self, label: str, spec: Any, inputs: list[Edge]) -> str:
        """Derive a uid from the step's kind, its config's class and its inputs (as Flink's operator hash).

        Steps with the same signature (two identical maps of one stream) are told
        apart by the order in which they were added.
        """
        kind = type(spec)
        parts = [label, f"{kind.__module__}.{kind.__qualname__}"]
        parts += [f"{self.nodes[e.node].uid}:{e.port}:{','.join(e.keys) if e.keys is not None else ''}"
                  for e in inputs]
        signature = "|".join(parts)
        occurrence = self._signatures.get(signature, 0)
        self._signatures[signature] = occurrence + 1
        digest = hashlib.sha256(f"{signature}#{occurrence}".encode()).hexdigest()[:16]
        return f"{label}{_UID_SEPARATOR}{digest}"

    def _add(self, kind: NodeKind, label: str, spec: Any, inputs: list[Edge], *, name: str | None,
             parallelism: int | None = None, keyed: bool = False,
             watermark: BoundedOutOfOrderness | None = None, key_columns: tuple[str, ...] | None = None) -> Node:
        if parallelism is not None and parallelism < 1:
            msg = f"operator {name or label!r}: parallelism must be >= 1, got {parallelism}"
            raise PlanError(msg)
        node_name = self._name(name, label)
        if key_columns is not None:  # the node partitions its own input (dedupe): errors name the node
            inputs = [Edge(e.node, e.port, key_columns, node_name) for e in inputs]
        uid = name if name is not None else self._uid(label, spec, inputs)
        node = Node(len(self.nodes), node_name, kind, spec, inputs, parallelism, keyed, watermark, uid)
        self.nodes.append(node)
        return node

    def source(self, source: Source, *, name: str | None = None,
               watermark: BoundedOutOfOrderness | None = None, parallelism: int | None = None) -> SourceStream:
        """Add a source; the stream it returns also gives the source's :meth:`~SourceStream.dead_letters`.

        Args:
            source: a replayable source config (``GeneratorSource``, ``ParquetSource``, ...).
            name: the operator name; ``source_<n>`` by default. A name pins the
                source's checkpointed offsets: a resumed job matches them by it,
                whatever else changed in the graph.
            watermark: how event time and watermarks derive from the rows; without
                one the stream has no event time and cannot be windowed.
            parallelism: subtasks reading the source; the job's parallelism by default.

        """
        if not isinstance(source, Source):
            msg = f"flow.source() needs a onceflow source, got {type(source).__name__}; wrap your data in one"
            raise PlanError(msg)
        node = self._add(NodeKind.SOURCE, "source", source, [], name=name, parallelism=parallelism,
                         watermark=watermark)
        return SourceStream(self, node, MAIN, watermark.column if watermark else None)


class Stream:
    """A stream of Arrow record batches flowing out of one operator port."""

    def __init__(self, flow: Dataflow, node: Node, port: int, time_column: str | None) -> None:
        self.flow = flow
        self.node = node
        self.port = port
        self.time_column = time_column

    def _edge(self) -> Edge:
        return Edge(self.node.id, self.port)

    def _transform(self, label: str, spec: Any, name: str | None, parallelism: int | None) -> Stream:
        node = self.flow._add(NodeKind.TRANSFORM, label, spec, [self._edge()], name=name, parallelism=parallelism)
        return Stream(self.flow, node, MAIN, self.time_column)

    def map(self, fn: Callable[[Row], Row], *, name: str | None = None, parallelism: int | None = None) -> Stream:
        """Apply ``fn(row: dict) -> dict`` to every row (row-wise: prefer :meth:`map_batches`)."""
        return self._transform("map", Map(fn), name, parallelism)

    def filter(self, predicate: Callable[[Row], bool], *, name: str | None = None,
               parallelism: int | None = None) -> Stream:
        """Keep the rows for which ``predicate(row: dict)`` is true (row-wise)."""
        return self._transform("filter", Filter(predicate), name, parallelism)

    def flat_map(self, fn: Callable[[Row], Iterable[Row]], *, name: str | None = None,
                 parallelism: int | None = None) -> Stream:
        """Replace every row by the dicts ``fn(row)`` returns (row-wise)."""
        return self._transform("flat_map", FlatMap(fn), name, parallelism)

    def map_batches(self, fn: Callable[[pa.RecordBatch], pa.RecordBatch | pa.Table], *,
                    name: str | None = None, schema: pa.Schema | None = None,
                    parallelism: int | None = None, errors: str = "fail") -> Stream:
        """Apply a vectorised ``fn(batch) -> batch``; every output must have one schema.

        With ``errors="dead_letter"``, the rows ``fn`` fails on (found by
        retrying halves of a failing batch, so ``fn`` must treat rows
        independently) go to :meth:`dead_letters` with an ``error`` column
        instead of failing the job.
        """
        return self._transform("map_batches", MapBatches(fn, schema, errors), name, parallelism)

    def dead_letters(self, name: str | None = None) -> Stream:
        """The records this step could not take (a side output), one row each, with why in ``error``.

        Only these steps have them: a ``KafkaSource`` or ``JsonLinesSource``
        built with ``dead_letter=True`` (rows
        :data:`~onceflow.operators.sources.kafka.KAFKA_DEAD_LETTER_SCHEMA`:
        key, value, partition, offset, timestamp, error; or
        :data:`~onceflow.operators.sources.jsonl.JSON_LINES_DEAD_LETTER_SCHEMA`:
        file, line, offset, value, error), and ``map_batches(...,
        errors="dead_letter")`` (its input's columns and ``error``). They carry
        no event time, so they neither hold watermarks back nor come late.

        Args:
            name: the name of the step that passes the dead letters on; ``dead_letters_<n>`` by default.

        Returns:
            The stream of dead letters, to sink anywhere.

        Raises:
            PlanError: the step emits no dead letters.

        Example:
            >>> import pyarrow as pa
            >>> from onceflow.operators.sources.kafka import KafkaSource
            >>> from onceflow.testing.sink import TestingSink
            >>> flow = Dataflow("orders")
            >>> schema = pa.schema([("id", pa.int64())])
            >>> orders = flow.source(KafkaSource("localhost:9092", "orders", schema, dead_letter=True))
            >>> orders.dead_letters(name="bad_orders").sink(TestingSink(), name="bad_out")
            >>> [node.name for node in flow.nodes]
            ['source_0', 'bad_orders', 'bad_out']
            >>> flow.source(KafkaSource("localhost:9092", "orders", schema)).dead_letters()
            Traceback (most recent call last):
            ...
            onceflow.errors.PlanError: step 'source_3' (KafkaSource) emits no dead letters; only KafkaSource and \
JsonLinesSource with dead_letter=True, and map_batches with errors='dead_letter', do

        """
        spec = self.node.spec
        side_ports = getattr(spec, "side_ports", None)
        if self.port != MAIN or side_ports is None or DEAD_LETTERS not in side_ports():
            msg = (f"step {self.node.name!r} ({type(spec).__name__}) emits no dead letters; only KafkaSource and "
                   "JsonLinesSource with dead_letter=True, and map_batches with errors='dead_letter', do")
            raise PlanError(msg)
        node = self.flow._add(NodeKind.TRANSFORM, "dead_letters", Forward(), [Edge(self.node.id, DEAD_LETTERS)],
                              name=name)
        return Stream(self.flow, node, MAIN, None)

    def key_by(self, columns: str | Sequence[str], *, name: str | None = None) -> KeyedStream:
        """Partition the stream by the values of ``columns`` (hashed into key groups)."""
        keys = (columns,) if isinstance(columns, str) else tuple(columns)
        if not keys or not all(isinstance(k, str) and k for k in keys):
            msg = f"key_by needs one or more column names, got {columns!r}"
            raise PlanError(msg)
        label = self.flow._name(name, "key_by")
        return KeyedStream(self, keys, label)

    def dedupe(self, on: str | Sequence[str], *, within_ms: int, mode: DedupeMode = "bloom",
               fp_rate: float = 0.01, expected_items: int = 1_000_000, time_column: str | None = None,
               name: str | None = None, parallelism: int | None = None) -> Stream:
        """Drop events whose id (``on``) was already seen within ``within_ms`` of event time.

        The stream is keyed by ``on``, so each subtask owns its share of the
        ids. See :mod:`onceflow.operators.dedupe` for the modes, the generations and
        the guarantees.

        Args:
            on: the id column or columns.
            within_ms: how long after its event time an id is remembered, at least (by watermark).
            mode: ``"bloom"`` (bounded memory, rare false positives) or ``"exact"`` (keyed sets).
            fp_rate: bloom mode's designed false-positive rate.
            expected_items: distinct ids per ``within_ms`` across all subtasks (sizes the filters).
            time_column: the event time column; the source's watermark column by default.
            name: the operator name; ``dedupe_<n>`` by default; it pins the
                operator's checkpointed state across changes to the graph.
            parallelism: subtasks; the job's parallelism by default.

        Raises:
            PlanError: the stream has no event time, or an argument is out of range.

        """
        keys = (on,) if isinstance(on, str) else tuple(on)
        column = time_column or self.time_column
        if column is None:
            msg = (
                f"{name or 'dedupe'}: the stream has no event time; give its source "
                "watermark=BoundedOutOfOrderness(column, ...) or pass dedupe(..., time_column=)"
            )
            raise PlanError(msg)
        spec = Dedupe(keys, within_ms, time_column=column, mode=mode, fp_rate=fp_rate,
                      expected_items=expected_items)
        node = self.flow._add(NodeKind.TRANSFORM, "dedupe", spec, [self._edge()], name=name,
                              parallelism=parallelism, keyed=True, key_columns=spec.columns)
        return Stream(self.flow, node, MAIN, self.time_column)

    def union(self, *others: Stream, name: str | None = None, parallelism: int | None = None) -> Stream:
        """Merge this stream with ``others`` (same columns expected downstream)."""
        for other in others:
            if other.flow is not self.flow:
                msg = "union() takes streams of the same dataflow"
                raise PlanError(msg)
        inputs = [self._edge(), *(o._edge() for o in others)]
        node = self.flow._add(NodeKind.TRANSFORM, "union", MapBatches(_identity), inputs, name=name,
                              parallelism=parallelism)
        return Stream(self.flow, node, MAIN, self.time_column)

    def iterate(self, *, name: str | None = None, parallelism: int | None = None) -> IterativeStream:
        """Open a loop: the stream returned carries this stream's rows and those fed back by ``close_with``.

        Build the loop's body on the returned stream, then call
        :meth:`IterativeStream.close_with` with the stream that goes round
        again; what else is built on the body leaves the loop. Operators in the
        body may be keyed and stateful (``key_by(...).process``/``reduce``);
        event-time operators (windows, dedupe) may not, because a loop holds
        event time back: no watermark crosses it until the loop has ended, so
        a row that comes round again is never late behind one.

        Checkpoints of a job with a loop follow Chandy-Lamport: the head
        snapshots on the barrier of its input, then records the rows that come
        round until the barrier does, and a restore replays them (the
        checkpoint's channel state). A bounded job with a loop ends when every
        input of the loop has ended and the loop is empty (see ``DESIGN.md``).

        Example:
            >>> from onceflow.testing.source import TestingSource
            >>> from onceflow.testing.sink import TestingSink
            >>> flow = Dataflow("retry")
            >>> loop = flow.source(TestingSource([{"id": 1, "left": 2}])).iterate(name="loop")
            >>> step = loop.map(lambda r: {"id": r["id"], "left": r["left"] - 1})
            >>> loop.close_with(step.filter(lambda r: r["left"] > 0))
            >>> step.filter(lambda r: r["left"] <= 0).sink(TestingSink())

        Args:
            name: the loop head's name; ``iterate_<n>`` by default.
            parallelism: the loop head's subtasks; the job's parallelism by default.

        """
        node = self.flow._add(NodeKind.TRANSFORM, "iterate", LoopHead(), [self._edge()], name=name,
                              parallelism=parallelism)
        return IterativeStream(self.flow, node, MAIN, self.time_column)

    def sink(self, sink: TransactionalSink, *, name: str | None = None, parallelism: int | None = None) -> None:
        """Write the stream to ``sink`` (committed in two phases).

        Pass ``name=`` to keep matching its checkpointed transactions when the graph changes upstream.
        """
        if not isinstance(sink, TransactionalSink):
            msg = f"stream.sink() needs a onceflow sink, got {type(sink).__name__}"
            raise PlanError(msg)
        self.flow._add(NodeKind.SINK, "sink", sink, [self._edge()], name=name, parallelism=parallelism)


def _identity(batch: pa.RecordBatch) -> pa.RecordBatch:
    return batch


class IterativeStream(Stream):
    """The head of a loop (:meth:`Stream.iterate`): close it with :meth:`close_with`."""

    def close_with(self, feedback: Stream) -> None:
        """Feed ``feedback`` back to this loop's head; it must be built on this stream.

        Its rows must have the columns of the loop's input. The feedback edge
        goes forward when the parallelisms match and round-robin otherwise;
        key the body (``key_by``) where rows of a key must meet.

        Raises:
            PlanError: the loop is closed already, or ``feedback`` is not built on this loop.
        """
        if feedback.flow is not self.flow:
            msg = f"{self.node.name}: close_with() takes a stream of the same dataflow"
            raise PlanError(msg)
        if any(edge.feedback for edge in self.node.inputs):
            msg = f"loop {self.node.name!r} is closed already; call close_with() once per iterate()"
            raise PlanError(msg)
        if not _reaches(self.flow, feedback.node.id, self.node.id):
            msg = (f"close_with({feedback.node.name!r}): the feedback stream must be built on loop "
                   f"{self.node.name!r} (iterate() returned the stream to build the loop's body on)")
            raise PlanError(msg)
        self.node.inputs.append(Edge(feedback.node.id, feedback.port, feedback=True))


def _reaches(flow: Dataflow, node: int, ancestor: int) -> bool:
    """Whether ``node`` is built on ``ancestor`` (following input edges, not feedback ones)."""
    seen, todo = set(), [node]
    while todo:
        current = todo.pop()
        if current == ancestor:
            return True
        if current not in seen:
            seen.add(current)
            todo += [edge.node for edge in flow.nodes[current].inputs if not edge.feedback]
    return False


class KeyedStream:
    """A stream partitioned by key: keyed state and windows live here."""

    def __init__(self, stream: Stream, keys: tuple[str, ...], name: str) -> None:
        self._stream = stream
        self.keys = keys
        self.name = name

    def _keyed(self, label: str, spec: Any, name: str | None, parallelism: int | None) -> Node:
        edge = Edge(self._stream.node.id, self._stream.port, self.keys, self.name)
        return self._stream.flow._add(NodeKind.TRANSFORM, label, spec, [edge], name=name,
                                      parallelism=parallelism, keyed=True)

    def window(self, window: Tumbling | Sliding | Session, *, time_column: str | None = None,
               allowed_lateness_ms: int = 0) -> WindowedStream:
        """Group each key's events into event-time windows.

        Args:
            window: ``Tumbling``, ``Sliding`` or ``Session``.
            time_column: the event time column; the source's watermark column by default.
            allowed_lateness_ms: keep a fired window's state this long for late events.

        """
        column = time_column or self._stream.time_column
        if column is None:
            msg = (
                f"{self.name}: the stream has no event time; give its source "
                "watermark=BoundedOutOfOrderness(column, ...) or pass window(..., time_column=)"
            )
            raise PlanError(msg)
        return WindowedStream(self, window, column, allowed_lateness_ms)

    def process(self, fn: ProcessFn, *, name: str | None = None, parallelism: int | None = None) -> Stream:
        """Run ``fn(state, row) -> (state, output)`` per row with state per key.

        Pass ``name=`` to keep its checkpointed state when the graph changes: a resumed job matches state by it.
        """
        node = self._keyed("process", KeyedProcess(fn, self.keys), name, parallelism)
        return Stream(self._stream.flow, node, MAIN, self._stream.time_column)

    def reduce(self, fn: ReduceFn, *, name: str | None = None, parallelism: int | None = None) -> Stream:
        """Fold rows per key with ``fn(accumulated, row)``; emit every updated row.

        Pass ``name=`` to keep its checkpointed state when the graph changes: a resumed job matches state by it.
        """
        node = self._keyed("reduce", KeyedReduce(fn, self.keys), name, parallelism)
        return Stream(self._stream.flow, node, MAIN, self._stream.time_column)


class WindowedStream:
    """A keyed stream grouped into windows; call :meth:`aggregate`."""

    def __init__(self, keyed: KeyedStream, window: Tumbling | Sliding | Session, time_column: str,
                 allowed_lateness_ms: int) -> None:
        self._keyed = keyed
        self._window = window
        self._time_column = time_column
        self._allowed_lateness_ms = allowed_lateness_ms

    def aggregate(self, *, name: str | None = None, parallelism: int | None = None,
                  **aggregates: Aggregation) -> WindowAggregateStream:
        """Aggregate every window; emit keys, ``window_start``, ``window_end`` and one column per aggregate.

        Pass ``name=`` to keep its checkpointed state when the graph changes: a resumed job matches state by it.
        """
        if not aggregates:
            msg = f"{self._keyed.name}: aggregate() needs at least one named aggregation, e.g. count=agg.count()"
            raise PlanError(msg)
        spec = WindowAggregate(self._window, list(self._keyed.keys), self._time_column, dict(aggregates),
                               self._allowed_lateness_ms)
        node = self._keyed._keyed("window", spec, name, parallelism)
        return WindowAggregateStream(self._keyed._stream.flow, node, MAIN, None)


class WindowAggregateStream(Stream):
    """The output of a window aggregation; :meth:`late_events` gives its late input."""

    def late_events(self) -> Stream:
        """The input rows that arrived after their window fired (a side output)."""
        return Stream(self.flow, self.node, LATE, None)


class SourceStream(Stream):
    """The rows a source reads; its :meth:`~Stream.dead_letters` are the records it could not decode."""
