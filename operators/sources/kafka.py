"""A replayable source reading a Kafka topic, split by partition.

The topic's partitions are the splits: with parallelism *p*, subtask *i*
reads partitions ``i, i + p, i + 2p, ...``. A reader's offset is the next
offset to read of each of its partitions, ``{"partitions": [[partition,
next_offset], ...]}``, and the checkpoint holds it: it is the only record of
progress. Readers are placed with ``assign()`` at those offsets; they never
join a consumer group's rebalancing and never commit group offsets. When a
job resumes at another parallelism the old readers' maps are merged and
every new reader takes its partitions from it (a partition no old reader
knew starts at its earliest offset).

Messages are read with ``isolation.level=read_committed`` by default, so
records of aborted transactions are never seen, and records of open ones
only once they commit. ``stop_at="end"`` makes the job bounded: at start each
reader takes its partitions' end offsets (with ``read_committed`` the *last
stable offset*: the first offset of the oldest transaction still open, so
a transaction open at start and everything after it is not read) and ends
once it reached all of them.

A value that does not decode fails the job, or with ``dead_letter=True``
leaves its batch for the source's dead-letter side output (port
:data:`~onceflow.operators.logic.DEAD_LETTERS`; the reader is
:class:`~onceflow.operators.sources.base.SideOutputs`). A batch is decoded
by one Arrow parse; only when that fails is it bisected to find the
messages that do not decode.

``confluent-kafka`` is an optional dependency (``pip install 'onceflow[kafka]'``),
imported only where the source talks to a broker.

Event time is tracked per partition (the reader is
:class:`~onceflow.operators.sources.base.PerSplitWatermarks`): partitions are
read side by side and may run apart, so a reader's watermark is the lowest
over its partitions, and with ``idle_timeout_s`` a partition that delivered
nothing for that long stops holding it back until it delivers again. Each
partition's largest event time is kept in the offset beside its position.

Partitions are aligned in event time. The client delivers a reader's
partitions in large runs (a whole backlog of one before the next), so the
reader's watermark, the lowest over its partitions, would stand still until
the first partition's backlog is read, while windows hold everything read so
far. With a watermark the reader therefore *pauses* a partition whose largest
event time runs more than ``max_partition_skew_ms`` ahead of the slowest
partition that still has messages to read, and resumes it once that one has
caught up (Flink's split-level watermark alignment). A partition read to its
end (or its ``stop_at`` end) does not count as slowest, so a quiet partition
never holds the others; the slowest partition is never paused, so reading
always progresses. Pausing only changes the order of reads, never what is
read: positions advance by the messages returned.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa

from onceflow.errors import DataError, OperatorError, PlanError
from onceflow.operators.json_decoder import JsonObjectDecoder
from onceflow.operators.kafka_client import confluent_kafka
from onceflow.operators.logic import DEAD_LETTERS, Emitted
from onceflow.operators.sources.base import (
    Idle,
    PerSplitWatermarks,
    RescaledOffsets,
    SideOutputs,
    Source,
    SourceContext,
    SourceReader,
)

if TYPE_CHECKING:
    from confluent_kafka import Consumer, Message

    from onceflow.operators.watermark import BoundedOutOfOrderness, SplitWatermarkGenerator

__all__ = ["KAFKA_DEAD_LETTER_SCHEMA", "KAFKA_RAW_SCHEMA", "KafkaSource", "KafkaSourceReader"]

KAFKA_RAW_SCHEMA = pa.schema([
    ("key", pa.binary()), ("value", pa.binary()), ("partition", pa.int32()),
    ("offset", pa.int64()), ("timestamp", pa.int64()),
])
"""The columns of ``format="raw"``: the message key and value, where it was, and its timestamp in ms."""

KAFKA_DEAD_LETTER_SCHEMA = KAFKA_RAW_SCHEMA.append(pa.field("error", pa.string()))
"""The columns of a source's dead letters: :data:`KAFKA_RAW_SCHEMA` and ``error``, why the value did not decode."""

_FIXED_CONFIG = {"enable.auto.commit": False, "enable.auto.offset.store": False, "enable.partition.eof": True}
"""Consumer settings the source relies on: progress lives in checkpoints only; partition ends are reported."""


def _kafka(topic: str) -> Any:
    return confluent_kafka(f"kafka source {topic!r}")


class KafkaSource(Source):
    """Reads a Kafka topic, split across subtasks by partition, offsets kept in checkpoints.

    Args:
        bootstrap_servers: the brokers, ``host:port[,host:port...]``.
        topic: the topic to read.
        schema: the columns of ``format="json"`` (each message value is one
            JSON object; fields not in the schema are ignored, missing ones are
            null). Ignored (may be ``None``) for ``format="raw"``.
        format: ``"json"`` or ``"raw"`` (columns ``key``, ``value``,
            ``partition``, ``offset``, ``timestamp``: :data:`KAFKA_RAW_SCHEMA`).
        stop_at: ``None`` to read without end, ``"end"`` to end at the end
            offsets each reader sees when it starts.
        batch_size: the most messages per batch.
        poll_timeout_s: how long one read waits for messages before it
            returns :class:`~onceflow.operators.sources.base.Idle` (the read
            blocks the subtask, so keep it short).
        idle_s: how long the runtime waits before reading again after an empty read.
        idle_timeout_s: with a watermark, after how many seconds without
            messages a partition stops holding the reader's watermark back
            (until it delivers again); ``None`` (default): never, a quiet
            partition stalls event time.
        max_partition_skew_ms: with a watermark, how far (event time, ms) a
            reader lets one of its partitions run ahead of the slowest one that
            still has messages to read before it pauses it (see the module
            docstring); ``None`` reads partitions as the client delivers them.
        isolation_level: ``"read_committed"`` (skip aborted transactions) or
            ``"read_uncommitted"``.
        metadata_timeout_s: how long a metadata or offset lookup may take
            before the source gives up (an unreachable broker fails then).
        group_id: the ``group.id`` librdkafka requires; no offsets are ever
            committed under it. Default ``onceflow-<topic>``.
        config: more librdkafka consumer settings (security, fetch sizes);
            they cannot turn on auto commit or turn off partition EOF events.
        dead_letter: with ``format="json"``, what a message whose value does
            not decode (invalid JSON, a field that does not convert to the
            schema's type) does: ``False`` (default) fails the job with a
            :class:`~onceflow.errors.DataError` naming its topic, partition
            and offset; ``True`` takes it out of its batch (the others go on,
            in order) and emits it on the source's dead-letter side output,
            which ``flow.source(...).dead_letters()`` returns: columns
            :data:`KAFKA_DEAD_LETTER_SCHEMA` (key, value, partition, offset,
            timestamp, and ``error``, why it did not decode). The same offsets
            cover both outputs, so each dead letter is emitted exactly once
            across restarts too. Dead letters carry no event time; a job
            that does not consume ``dead_letters()`` drops them.

    Raises:
        PlanError: an option is out of range.

    Example:
        >>> import pyarrow as pa
        >>> source = KafkaSource("localhost:9092", "clicks", pa.schema([("user", pa.int64())]), stop_at="end")
        >>> source.topic, source.format, source.stop_at
        ('clicks', 'json', 'end')
        >>> import onceflow as of
        >>> flow = of.Dataflow("clicks")
        >>> clicks = flow.source(KafkaSource("localhost:9092", "clicks", source.schema, dead_letter=True))
        >>> clicks.dead_letters().sink(of.sinks.TestingSink())
        >>> flow.nodes[-1].inputs[0].node, KAFKA_DEAD_LETTER_SCHEMA.names
        (1, ['key', 'value', 'partition', 'offset', 'timestamp', 'error'])

    """

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str,
        schema: pa.Schema | None = None,
        format: Literal["json", "raw"] = "json",
        stop_at: Literal["end"] | None = None,
        *,
        batch_size: int = 10_000,
        poll_timeout_s: float = 0.02,
        idle_s: float = 0.05,
        idle_timeout_s: float | None = None,
        max_partition_skew_ms: int | None = 10_000,
        isolation_level: Literal["read_committed", "read_uncommitted"] = "read_committed",
        metadata_timeout_s: float = 10.0,
        group_id: str | None = None,
        config: Mapping[str, Any] | None = None,
        dead_letter: bool = False,
    ) -> None:
        if format not in ("json", "raw"):
            msg = f"kafka source {topic!r}: format must be 'json' or 'raw', got {format!r}"
            raise PlanError(msg)
        if format == "json" and not isinstance(schema, pa.Schema):
            msg = f"kafka source {topic!r}: format='json' needs schema=pa.schema([...]) for the message values"
            raise PlanError(msg)
        if stop_at not in (None, "end"):
            msg = f"kafka source {topic!r}: stop_at must be None or 'end', got {stop_at!r}"
            raise PlanError(msg)
        if isolation_level not in ("read_committed", "read_uncommitted"):
            msg = f"kafka source {topic!r}: isolation_level must be 'read_committed' or 'read_uncommitted'"
            raise PlanError(msg)
        if batch_size <= 0 or poll_timeout_s < 0 or idle_s < 0 or metadata_timeout_s <= 0:
            msg = (f"kafka source {topic!r}: batch_size and metadata_timeout_s must be > 0, poll_timeout_s and "
                   f"idle_s >= 0; got {batch_size}, {metadata_timeout_s}, {poll_timeout_s}, {idle_s}")
            raise PlanError(msg)
        if idle_timeout_s is not None and idle_timeout_s <= 0:
            msg = f"kafka source {topic!r}: idle_timeout_s must be > 0 or None, got {idle_timeout_s}"
            raise PlanError(msg)
        if max_partition_skew_ms is not None and (not isinstance(max_partition_skew_ms, int)
                                                  or max_partition_skew_ms < 0):
            msg = (f"kafka source {topic!r}: max_partition_skew_ms must be an int >= 0 or None, "
                   f"got {max_partition_skew_ms!r}")
            raise PlanError(msg)
        if dead_letter and format != "json":
            msg = (f"kafka source {topic!r}: dead_letter=True needs format='json' (every raw message decodes); "
                   "drop dead_letter or read JSON")
            raise PlanError(msg)
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.schema = schema if format == "json" else KAFKA_RAW_SCHEMA
        self.format = format
        self.stop_at = stop_at
        self.batch_size = batch_size
        self.poll_timeout_s = poll_timeout_s
        self.idle_s = idle_s
        self.idle_timeout_s = idle_timeout_s
        self.max_partition_skew_ms = max_partition_skew_ms
        self.isolation_level = isolation_level
        self.metadata_timeout_s = metadata_timeout_s
        self.group_id = group_id or f"onceflow-{topic}"
        self.config = dict(config or {})
        self.dead_letter = bool(dead_letter)

    def consumer_config(self) -> dict[str, Any]:
        """Return the librdkafka settings of the source's consumers."""
        return {"bootstrap.servers": self.bootstrap_servers, "group.id": self.group_id,
                "isolation.level": self.isolation_level, "auto.offset.reset": "error",
                **self.config, **_FIXED_CONFIG}

    def side_ports(self) -> frozenset[int]:
        """Return ``{DEAD_LETTERS}`` with ``dead_letter=True``, else no port."""
        return frozenset({DEAD_LETTERS}) if self.dead_letter else frozenset()

    def max_parallelism(self) -> int:
        """Return the topic's number of partitions (a subtask without one would idle).

        Raises:
            PlanError: confluent-kafka is missing, the broker does not answer, or the topic does not exist or has
                no partitions.
        """
        consumer = _kafka(self.topic).Consumer(self.consumer_config())
        try:
            return len(self._partitions(consumer, "", PlanError))
        finally:
            consumer.close()

    def build(self, ctx: SourceContext, resume_offset: Any | None = None) -> KafkaSourceReader:
        """Connect and return the reader of ``ctx.subtask``'s partitions.

        Args:
            ctx: where the reader runs.
            resume_offset: ``None`` to start at each partition's earliest
                offset, an ``offset()`` of this subtask's earlier reader, or
                :class:`~onceflow.operators.sources.base.RescaledOffsets`.

        Returns:
            The reader.

        Raises:
            OperatorError: the broker does not answer, or the topic does not exist.
            PlanError: ``resume_offset`` is malformed.

        """
        known, event_times = _resume_positions(ctx, resume_offset, self.topic)
        kafka = _kafka(self.topic)
        consumer = kafka.Consumer(self.consumer_config())
        try:
            every = self._partitions(consumer, ctx.operator, OperatorError)
            mine = [p for p in every if p % max(ctx.parallelism, 1) == ctx.subtask]
            positions: dict[int, int] = {}
            ends: dict[int, int] = {}
            for partition in mine:
                low, high = self._watermarks(consumer, partition, ctx.operator)
                positions[partition] = known.get(partition, low)
                if self.stop_at == "end":
                    ends[partition] = high
            consumer.assign([kafka.TopicPartition(self.topic, p, o) for p, o in positions.items()])
        except BaseException:
            consumer.close()
            raise
        return KafkaSourceReader(self, ctx, consumer, positions, ends if self.stop_at == "end" else None,
                                 {p: t for p, t in event_times.items() if p in positions})

    def _partitions(self, consumer: Consumer, operator: str, error: type[PlanError | OperatorError]) -> list[int]:
        """Return the topic's partition ids, raising ``error`` when it cannot be read."""
        kafka = _kafka(self.topic)
        try:
            metadata = consumer.list_topics(self.topic, timeout=self.metadata_timeout_s)
        except kafka.KafkaException as failure:
            msg = (f"kafka source{_named(operator)}: no metadata for topic {self.topic!r} from "
                   f"{self.bootstrap_servers} within {self.metadata_timeout_s} s ({failure.args[0].str()}); "
                   "check that the broker is up")
            raise error(msg) from failure
        found = metadata.topics.get(self.topic)
        if found is None or found.error is not None or not found.partitions:
            why = "has no partitions" if found is not None and found.error is None else "does not exist"
            msg = (f"kafka source{_named(operator)}: topic {self.topic!r} {why} on {self.bootstrap_servers}; "
                   "create it first")
            raise error(msg)
        return sorted(found.partitions)

    def _watermarks(self, consumer: Consumer, partition: int, operator: str) -> tuple[int, int]:
        """Return a partition's earliest offset and end offset (the last stable one under read_committed)."""
        kafka = _kafka(self.topic)
        try:
            low, high = consumer.get_watermark_offsets(kafka.TopicPartition(self.topic, partition),
                                                       timeout=self.metadata_timeout_s, cached=False)
        except kafka.KafkaException as failure:
            msg = (f"kafka source {operator}: no offsets for partition {partition} of {self.topic!r} within "
                   f"{self.metadata_timeout_s} s ({failure.args[0].str()}); check that the broker is up")
            raise OperatorError(msg, operator=operator) from failure
        return int(low), int(high)


def partitions_to_pause(times: Mapping[int, int], readable: Iterable[int], max_skew_ms: int) -> set[int]:
    """Return the readable partitions to pause: those more than ``max_skew_ms`` ahead of the slowest readable one.

    Args:
        times: each partition's largest event time seen (a partition not in it has delivered nothing yet).
        readable: the partitions with messages left to read (neither at their end nor caught up).
        max_skew_ms: how far ahead of the slowest a partition may run.

    A readable partition without an event time is the slowest of all: the
    others wait until it delivers (or turns out to be empty).

    Example:
        >>> sorted(partitions_to_pause({0: 9_000, 1: 1_000, 2: 3_000}, [0, 1, 2], max_skew_ms=2_000))
        [0]
        >>> sorted(partitions_to_pause({0: 9_000, 1: 1_000}, [0], max_skew_ms=2_000))  # 1 is at its end
        []
        >>> sorted(partitions_to_pause({0: 9_000}, [0, 1], max_skew_ms=2_000))  # 1 has not delivered yet
        [0]
    """
    readable = set(readable)
    if any(p not in times for p in readable):
        return {p for p in readable if p in times}
    if not readable:
        return set()
    slowest = min(times[p] for p in readable)
    return {p for p in readable if times[p] > slowest + max_skew_ms}


class KafkaSourceReader(SourceReader, PerSplitWatermarks, SideOutputs):
    """Reads one subtask's partitions of a :class:`KafkaSource` (built by :meth:`KafkaSource.build`).

    Args:
        source: the source's settings.
        ctx: where the reader runs.
        consumer: a consumer assigned to the partitions at ``positions``.
        positions: each partition's next offset to read.
        ends: each partition's end offset with ``stop_at="end"``, else ``None``.
        event_times: each partition's largest event time from the resume offset.

    """

    def __init__(self, source: KafkaSource, ctx: SourceContext, consumer: Consumer,
                 positions: dict[int, int], ends: dict[int, int] | None,
                 event_times: dict[int, int] | None = None) -> None:
        self._source = source
        self._ctx = ctx
        self._consumer: Consumer | None = consumer
        self._positions = dict(positions)
        self._ends = ends
        self._event_times = dict(event_times or {})
        self._watermarks: SplitWatermarkGenerator | None = None
        self._caught_up: set[int] = set()
        """Partitions whose last event was the end of what is readable now."""
        self._paused: set[int] = set()
        self._eof_code = _kafka(source.topic).KafkaError._PARTITION_EOF
        self._decode: Callable[[list[Message]], _Decoded] = _decode_raw
        if source.format == "json":
            assert source.schema is not None
            self._decode = _JsonDecoder(source.schema)
        self._set_aside: Emitted = []

    def read(self) -> pa.RecordBatch | Idle | None:
        """Return the next batch of messages, ``Idle`` when none is ready, ``None`` at the end."""
        if self._consumer is None or self._finished():
            self.close()
            return None
        messages = []
        for message in self._consumer.consume(self._source.batch_size, self._source.poll_timeout_s):
            error, partition, at = message.error(), message.partition(), message.offset()
            assert partition is not None and at is not None  # set on every message consume() returns
            if error is not None:
                if error.code() != self._eof_code:
                    msg = (f"kafka source {self._ctx.operator}: reading {self._source.topic!r} partition "
                           f"{partition} failed ({error.str()})")
                    raise OperatorError(msg, operator=self._ctx.operator, subtask=self._ctx.subtask)
                # The end of what is readable now: past control records and aborted transactions too.
                end = self._ends[partition] if self._ends is not None else at
                self._positions[partition] = max(self._positions[partition], min(at, end))
                self._caught_up.add(partition)
                continue
            if self._ends is not None and at >= self._ends[partition]:
                # After the end taken at start: not returned, so a resume reads it again.
                self._positions[partition] = max(self._positions[partition], self._ends[partition])
                continue
            messages.append(message)
            self._positions[partition] = at + 1
            self._caught_up.discard(partition)
        if not messages:
            self._align()
            return Idle(self._source.idle_s) if not self._finished() else self.read()
        decoded = self._decode(messages)
        if decoded.rejected:
            if not self._source.dead_letter:
                raise self._decode_error(decoded.rejected[0])
            self._set_aside.append((DEAD_LETTERS, _dead_letter_batch(decoded.rejected)))
        if self._watermarks is not None:
            partitions = np.fromiter((m.partition() for m in decoded.messages), dtype=np.int64,
                                     count=len(decoded.messages))
            self._watermarks.observe_batch(decoded.batch, partitions)
        self._align()
        return decoded.batch

    def take_side_outputs(self) -> Emitted:
        """Return the dead letters set aside since the last call, on port ``DEAD_LETTERS``, and forget them."""
        taken, self._set_aside = self._set_aside, []
        return taken

    def split_watermarks(self, strategy: BoundedOutOfOrderness, max_event_time: int | None) -> SplitWatermarkGenerator:
        """Return the generator of this reader's partitions' watermarks (see the module's docstring)."""
        self._watermarks = strategy.build_per_split(self._ctx.operator, max_event_time,
                                                    idle_timeout_s=self._source.idle_timeout_s)
        self._watermarks.assign(sorted(self._positions), self._event_times)
        return self._watermarks

    def offset(self) -> dict[str, list[list[int]]]:
        """Return ``{"partitions": [[partition, next_offset], ...]}``, with a watermark also ``"event_times"``.

        ``"event_times"`` is ``[[partition, largest_event_time], ...]`` of the partitions that had one.
        """
        offset = {"partitions": [[p, o] for p, o in sorted(self._positions.items())]}
        if self._watermarks is not None:
            times = self._watermarks.split_max_event_times()
            offset["event_times"] = [[p, t] for p, t in sorted(times.items())]
        return offset

    def close(self) -> None:
        """Close the consumer (it commits nothing)."""
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    def _align(self) -> None:
        """Pause the partitions running ahead in event time, resume those back in step (module docstring)."""
        skew = self._source.max_partition_skew_ms
        if skew is None or self._watermarks is None or self._consumer is None:
            return
        readable = [p for p in self._positions if p not in self._caught_up
                    and (self._ends is None or self._positions[p] < self._ends[p])]
        pause = partitions_to_pause(self._watermarks.split_max_event_times(), readable, skew)
        kafka = _kafka(self._source.topic)
        if pause - self._paused:
            self._consumer.pause([kafka.TopicPartition(self._source.topic, p) for p in sorted(pause - self._paused)])
        if self._paused - pause:
            self._consumer.resume([kafka.TopicPartition(self._source.topic, p) for p in sorted(self._paused - pause)])
        self._paused = pause

    def _decode_error(self, rejected: _Rejected) -> DataError:
        message = rejected.message
        msg = (f"kafka source {self._ctx.operator}: the message at topic {self._source.topic!r} partition "
               f"{message.partition()} offset {message.offset()} does not decode as JSON of the schema "
               f"({rejected.reason}); fix or skip it upstream, or pass KafkaSource(..., dead_letter=True) to send "
               "it to the source's dead_letters()")
        return DataError(msg, operator=self._ctx.operator)

    def _finished(self) -> bool:
        if self._ends is None:
            return not self._positions
        return all(self._positions[p] >= end for p, end in self._ends.items())


def _named(operator: str) -> str:
    """`` <operator>`` for messages, nothing before the operator has a name (at plan time)."""
    return f" {operator}" if operator else ""


def _pairs(value: Any, *, signed: bool = False) -> bool:
    """Whether ``value`` is a list of ``[partition, integer]`` pairs (the integer >= 0 unless ``signed``)."""
    return isinstance(value, list | tuple) and all(
        isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(v, int) for v in pair)
        and pair[0] >= 0 and (signed or pair[1] >= 0) for pair in value)


def _resume_positions(ctx: SourceContext, resume_offset: Any, topic: str) -> tuple[dict[int, int], dict[int, int]]:
    """Return the known next offset and largest event time of every partition, from one or all old readers."""
    offsets = resume_offset.offsets if isinstance(resume_offset, RescaledOffsets) else (resume_offset,)
    positions: dict[int, int] = {}
    event_times: dict[int, int] = {}
    for offset in offsets:
        if offset is None:
            continue
        pairs = offset.get("partitions") if isinstance(offset, dict) else None
        times = offset.get("event_times", []) if isinstance(offset, dict) else None
        if not _pairs(pairs) or not _pairs(times, signed=True):
            msg = (f"kafka source {ctx.operator}: resume offset {offset!r} of topic {topic!r} is not "
                   "{'partitions': [[partition, next_offset], ...]}; resume from an offset() of a KafkaSource reader")
            raise PlanError(msg)
        assert isinstance(pairs, list | tuple) and isinstance(times, list | tuple)
        positions.update((int(p), int(o)) for p, o in pairs)
        event_times.update((int(p), int(t)) for p, t in times)
    return positions, event_times


def _raw_batch(messages: list[Message]) -> pa.RecordBatch:
    timestamps = [m.timestamp()[1] for m in messages]
    return pa.RecordBatch.from_arrays([
        pa.array([m.key() for m in messages], pa.binary()),
        pa.array([m.value() for m in messages], pa.binary()),
        pa.array([m.partition() for m in messages], pa.int32()),
        pa.array([m.offset() for m in messages], pa.int64()),
        pa.array([t if t >= 0 else None for t in timestamps], pa.int64()),
    ], schema=KAFKA_RAW_SCHEMA)


@dataclass(frozen=True, slots=True)
class _Rejected:
    """A message that does not decode, and why (naming the field when one is to blame)."""

    message: Message
    reason: str


@dataclass(frozen=True, slots=True)
class _Decoded:
    """What a batch of messages decodes to.

    Attributes:
        batch: the rows of the messages that decode, in order.
        messages: those messages, one per row.
        rejected: the others, in order.
    """

    batch: pa.RecordBatch
    messages: list[Message]
    rejected: list[_Rejected]


def _decode_raw(messages: list[Message]) -> _Decoded:
    """Every message decodes as raw bytes."""
    return _Decoded(_raw_batch(messages), messages, [])


def _dead_letter_batch(rejected: list[_Rejected]) -> pa.RecordBatch:
    raw = _raw_batch([r.message for r in rejected])
    return pa.RecordBatch.from_arrays([*raw.columns, pa.array([r.reason for r in rejected], pa.string())],
                                      schema=KAFKA_DEAD_LETTER_SCHEMA)


class _JsonDecoder:
    """Decodes message values, one JSON object each, into a batch of ``schema``.

    A :class:`~onceflow.operators.json_decoder.JsonObjectDecoder` does the
    work (one Arrow parse for a clean batch, bisection of a failing one); a
    value that spans lines is re-encoded as one line first.
    """

    def __init__(self, schema: pa.Schema) -> None:
        self._decoder = JsonObjectDecoder(schema)

    def __call__(self, messages: list[Message]) -> _Decoded:
        decoded = self._decoder.decode([_one_line(m.value()) for m in messages])
        rejected = [_Rejected(messages[r.index], self._decoder.why(messages[r.index].value() or b""))
                    for r in decoded.rejected]
        return _Decoded(decoded.batch, [messages[i] for i in decoded.decoded], rejected)


def _one_line(value: bytes | None) -> bytes:
    """The value as one JSON line (re-encoded when it spans lines); as it is when it cannot be one."""
    if not value or b"\n" not in value:
        return value or b""
    try:
        return json.dumps(json.loads(value)).encode()
    except ValueError:
        return value
