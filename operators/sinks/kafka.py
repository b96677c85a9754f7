"""A Kafka sink: exactly once through Kafka transactions replayable from the checkpoint, or at least once.

``delivery=`` picks the guarantee, as Flink's ``DeliveryGuarantee`` does:
``"exactly_once"`` (the default, below) or ``"at_least_once"`` (at the end).

librdkafka cannot resume a transaction another producer opened, so a
transaction that a crashed process pre-committed cannot be committed by the
next one. The sink therefore keeps in the checkpoint what each transaction
must contain, and makes its commit idempotent with a *marker* record:

* **Producers.** Each sink subtask has a small pool (``producers``, default
  4) of transactional producers with stable ids,
  ``onceflow:<job>:<operator>:<subtask>:<k>`` (text fields escaped as in
  :mod:`onceflow.operators.sinks.naming`). A new transaction opens on a free
  producer while earlier ones wait for their checkpoints to complete.
  ``init_transactions()`` when the writer starts fences any earlier producer
  with the same id (another attempt or run) and aborts its open transaction.
* **Write.** Rows are produced into the open transaction during the checkpoint
  interval, one JSON object per message value; ``key=`` names a column whose
  value (as UTF-8 text, or bytes as they are) becomes the message key, and
  librdkafka's default partitioner places it (no key: no message key).
* **Pre-commit (barrier).** The writer produces a marker into the same
  transaction, to partition 0 of the marker topic (``<topic>.onceflow-commits``
  unless ``marker_topic=`` names another; :meth:`KafkaSink.prepare` creates it
  with one partition if missing). Its key is the transactional id, its value
  ``{"txn", "checkpoint", "token"}`` with a random token per transaction. The
  writer flushes, and returns a :class:`KafkaTransaction` holding the
  transactional id, the checkpoint id, the token, the marker's offset and the
  transaction's rows as Arrow IPC bytes.
* **Commit (checkpoint complete).** The process that pre-committed still holds
  the producer: ``commit_transaction()``.
* **Recovery** (``resolve``, in any process, with no writer alive): first fence
  every producer of the operator: the pool ids of subtasks ``0..parallelism-1``,
  of every subtask a committable names, and every id of the operator whose
  marker sits in the marker partition's open tail (between the last stable
  offset and the high watermark, read uncommitted). ``init_transactions()``
  on an id aborts its open transaction and waits for one being committed.
  Then read the marker partition once with ``isolation.level=read_committed``
  from its first offset to the last stable offset (waiting, up to
  ``timeout_s``, until that offset has passed the high watermark seen at the
  start, so no marker written before is still undecided): a marker with a
  committable's token means its transaction committed, and nothing is done.
  (From the first offset, not the marker's: see ``_committed`` for the broker
  behaviour that makes a read from the middle unsafe.) Otherwise the rows and the marker (same
  token) are produced again in a fresh transaction of the same id and
  committed. Running it again finds that marker: idempotent.
  :meth:`KafkaSinkCommitter.abort_lingering` is the fencing step alone.

**Transaction timeout.** The broker aborts a transaction open longer than the
producers' ``transaction.timeout.ms`` (``transaction_timeout_s``, default
600 s). A transaction lives from its first row after barrier *n-1* until
checkpoint *n* completes, and a checkpoint that fails leaves it open until the
next one completes; so :meth:`KafkaSink.check_job` refuses, at submit, a job
whose ``transaction_timeout_s`` is not above ``(tolerable_failures + 1) *
(interval_s + min_pause_s + timeout_s)`` of its :class:`CheckpointConfig`.
Restart time does not enter the bound: a transaction the broker times out
while the job restarts loses nothing, because recovery produces its rows
again from the checkpoint (and the commit of a timed-out transaction fails,
which restarts the job the same way). Without checkpoints the one transaction
lasts as long as the job, which must end within the timeout (not checked).
The broker caps the timeout at its ``transaction.max.timeout.ms`` (15 min by
default): a producer asking for more fails at ``init_transactions``. The
marker topic must retain markers as long as checkpoints are kept (a
committable whose marker expired would be produced again).

Limits: the rows of a checkpoint interval are kept in memory and in the
checkpoint (size the interval accordingly); after a resume at a lower
parallelism, a transaction of a dropped subtask that was never pre-committed
stays open (holding back the last stable offset of the output topic) until the
broker times it out. Only ``format="json"`` is written.

**At least once** (``delivery="at_least_once"``): each subtask has one
idempotent producer without transactions (``enable.idempotence=true``,
``acks=all``) and produces rows as they come, visible to every reader at once.
On a barrier the writer (:class:`KafkaAtLeastOnceWriter`) flushes and raises
if a message was not delivered, so a completed checkpoint means its rows are
on the broker; it pre-commits nothing, writes no marker and has no recovery
step. Rows produced after the last completed checkpoint are produced again
when the job replays from it: duplicates are possible, loss is not. A job
without checkpoints that fails has published what it produced.
``producers``, ``marker_topic`` and ``transaction_timeout_s`` do not apply, nor
does the submit check.

Committables: :class:`KafkaTransaction`, stored as version 1 ``{"v": 1, "txn",
"checkpoint", "token", "topic", "key", "marker_topic", "marker_offset",
"rows"}``.

Example:
    >>> KafkaSink.transactional_id(SinkContext("features", "sink_3", subtask=1), 2)
    'onceflow:features:sink_3:1:2'
"""

from __future__ import annotations

import base64
import datetime
import decimal
import json
import logging
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Self

import pyarrow as pa

from onceflow.checkpoint.two_phase_commit import (
    Committable,
    CommittableRecord,
    Committer,
    SinkContext,
    SinkWriter,
    TransactionalSink,
    unsupported_version,
)
from onceflow.errors import PlanError, SinkCommitError
from onceflow.operators.kafka_client import confluent_kafka, produce_waiting
from onceflow.operators.sinks.naming import escape_field, split_fields

if TYPE_CHECKING:
    from confluent_kafka import Consumer, Producer

    from onceflow.checkpoint.config import CheckpointConfig
    from onceflow.runtime.restart import RestartStrategy

__all__ = [
    "KafkaAtLeastOnceCommitter",
    "KafkaAtLeastOnceWriter",
    "KafkaSink",
    "KafkaSinkCommitter",
    "KafkaSinkWriter",
    "KafkaTransaction",
]

log = logging.getLogger("onceflow")

_ID_FIELDS = 5
_MARKER_PARTITION = 0
_MARKER_SUFFIX = ".onceflow-commits"


def _kafka(topic: str) -> Any:
    return confluent_kafka(f"kafka sink {topic!r}")


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    return str(value)


def _message_key(value: Any) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    return str(value).encode()


def _rows_ipc(batches: list[pa.RecordBatch]) -> bytes:
    table = pa.concat_tables([pa.Table.from_batches([b]) for b in batches], promote_options="default")
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as stream:
        stream.write_table(table)
    return sink.getvalue().to_pybytes()


@dataclass(frozen=True, slots=True)
class KafkaTransaction(Committable):
    """A pre-committed Kafka transaction and what it holds, so that recovery can produce it again.

    Attributes:
        txn: the producer's ``transactional.id``.
        checkpoint: the checkpoint whose barrier pre-committed it (``None``: the end of a job without checkpoints).
        token: a random id of this transaction, carried by its marker.
        topic: the output topic.
        key: the column whose value is the message key, or ``None``.
        marker_topic: the topic of the marker.
        marker_offset: the marker's offset in partition 0 of ``marker_topic``, as written (for whoever
            inspects a checkpoint; recovery no longer reads from it, see ``KafkaSinkCommitter._committed``,
            and it stays in the stored layout, version 1).
        rows: the transaction's rows, an Arrow IPC stream.

    Example:
        >>> t = KafkaTransaction("onceflow:j:sink:0:1", 7, "ab", "out", None, "out.onceflow-commits", 12, b"")
        >>> sorted(t.to_record().to_dict())
        ['checkpoint', 'key', 'marker_offset', 'marker_topic', 'rows', 'token', 'topic', 'txn', 'v']

    """

    VERSION: ClassVar[int] = 1

    txn: str
    checkpoint: int | None
    token: str
    topic: str
    key: str | None
    marker_topic: str
    marker_offset: int
    rows: bytes = field(repr=False)

    def fields(self) -> dict[str, Any]:
        return {"txn": self.txn, "checkpoint": self.checkpoint, "token": self.token, "topic": self.topic,
                "key": self.key, "marker_topic": self.marker_topic, "marker_offset": self.marker_offset,
                "rows": self.rows}

    @classmethod
    def from_record(cls, record: CommittableRecord, *, operator: str = "") -> Self:
        if record.version != cls.VERSION:
            raise unsupported_version(record, (cls.VERSION,), sink="kafka sink", operator=operator)
        f = record.fields
        return cls(str(f["txn"]), f.get("checkpoint"), str(f["token"]), str(f["topic"]), f.get("key"),
                   str(f["marker_topic"]), int(f["marker_offset"]), bytes(f["rows"]))

    def table(self) -> pa.Table:
        """The transaction's rows."""
        return pa.ipc.open_stream(self.rows).read_all()

    def marker(self) -> bytes:
        """The marker's value."""
        return json.dumps({"txn": self.txn, "checkpoint": self.checkpoint, "token": self.token}).encode()


@dataclass(slots=True)
class _Precommitted:
    """A live producer whose transaction waits for its commit, and how to hand it back to its writer."""

    producer: Producer
    token: str
    release: Callable[[], None]


_LIVE: dict[str, _Precommitted] = {}
"""Transactional id -> its pre-committed transaction in this process (a commit finds its producer here)."""
_LIVE_LOCK = threading.Lock()
"""Guards :data:`_LIVE`."""


class KafkaSink(TransactionalSink[KafkaTransaction]):
    """Write a stream into a Kafka topic, exactly once or at least once (see the module docstring).

    It needs confluent-kafka (``pip install 'onceflow[kafka]'``).

    Args:
        bootstrap_servers: the brokers, ``host:port[,host:port...]``.
        topic: the output topic (it must exist).
        format: ``"json"``: each row is one message, a JSON object.
        key: the column whose value becomes the message key; ``None`` for no key.
        delivery: ``"exactly_once"`` (transactions committed with the checkpoints) or
            ``"at_least_once"`` (an idempotent producer, rows visible as they are produced).
        marker_topic: the topic of commit markers (created with one partition if missing);
            ``<topic>.onceflow-commits`` by default. Exactly once only.
        producers: transactional producers per subtask (transactions that may wait for their
            commit at once, plus one open). Exactly once only.
        transaction_timeout_s: the producers' ``transaction.timeout.ms``, in seconds; checked
            against the job's checkpoint settings at submit (:meth:`check_job`). Exactly once only.
        timeout_s: the longest one broker operation (flush, commit, a marker check) may take.
        config: more librdkafka producer settings.

    Raises:
        PlanError: an option is out of range, or ``delivery`` is neither mode.

    Example:
        >>> KafkaSink("localhost:9092", "out", delivery="at_least_once").delivery
        'at_least_once'
        >>> KafkaSink("localhost:9092", "out", delivery="exactly-once")
        Traceback (most recent call last):
        ...
        onceflow.errors.PlanError: kafka sink 'out': delivery must be 'exactly_once' or 'at_least_once', ...

    """

    def __init__(self, bootstrap_servers: str, topic: str, format: str = "json", key: str | None = None, *,
                 delivery: str = "exactly_once", marker_topic: str | None = None, producers: int = 4,
                 transaction_timeout_s: float = 600.0, timeout_s: float = 60.0,
                 config: dict[str, Any] | None = None) -> None:
        if not isinstance(delivery, str) or delivery not in _DELIVERIES:
            msg = (f"kafka sink {topic!r}: delivery must be 'exactly_once' or 'at_least_once', got {delivery!r}; "
                   "pass delivery='exactly_once' (the default)")
            raise PlanError(msg)
        if format != "json":
            msg = f"kafka sink {topic!r}: format must be 'json', got {format!r}"
            raise PlanError(msg)
        if producers < 2:
            msg = f"kafka sink {topic!r}: producers must be at least 2, got {producers}"
            raise PlanError(msg)
        if transaction_timeout_s <= 0 or timeout_s <= 0:
            msg = f"kafka sink {topic!r}: transaction_timeout_s and timeout_s must be > 0; pass seconds"
            raise PlanError(msg)
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.format = format
        self.key = key
        self.marker_topic = marker_topic or topic + _MARKER_SUFFIX
        self.producers = producers
        self.transaction_timeout_s = transaction_timeout_s
        self.timeout_s = timeout_s
        self.config = dict(config or {})
        self.delivery = delivery
        self._delivery = _DELIVERIES[delivery]

    @staticmethod
    def transactional_id(ctx: SinkContext, index: int, subtask: int | None = None) -> str:
        """The ``transactional.id`` of producer ``index`` of ``subtask`` (``ctx.subtask`` by default)."""
        return ":".join([
            "onceflow",
            escape_field(ctx.job, delimiter=":", limit=48),
            escape_field(ctx.operator, delimiter=":", limit=48),
            str(ctx.subtask if subtask is None else subtask),
            str(index),
        ])

    def producer(self, transactional_id: str) -> Producer:
        """A transactional producer with ``transactional_id``; ``init_transactions()`` fences earlier ones."""
        kafka = _kafka(self.topic)
        producer = kafka.Producer({
            **self.config,
            "bootstrap.servers": self.bootstrap_servers,
            "transactional.id": transactional_id,
            "transaction.timeout.ms": int(self.transaction_timeout_s * 1000),
            "enable.idempotence": True,
        })
        try:
            producer.init_transactions(self.timeout_s)
        except kafka.KafkaException as error:
            msg = (f"kafka sink {self.topic!r}: init_transactions of {transactional_id} failed ({error}); "
                   f"check that {self.bootstrap_servers} is up and supports transactions")
            raise SinkCommitError(msg) from error
        return producer

    def idempotent_producer(self) -> Producer:
        """A producer without transactions, ``enable.idempotence=true`` and ``acks=all`` (at least once)."""
        return _kafka(self.topic).Producer({
            **self.config,
            "bootstrap.servers": self.bootstrap_servers,
            "enable.idempotence": True,
            "acks": "all",
        })

    def producers_for(self, transactional_ids: list[str]) -> list[Producer]:
        """:meth:`producer` for each id, fenced side by side (fencing an open transaction waits for its abort)."""
        if not transactional_ids:
            return []
        with ThreadPoolExecutor(max_workers=min(len(transactional_ids), 16)) as pool:
            return list(pool.map(self.producer, transactional_ids))

    def consumer(self, isolation_level: str = "read_committed") -> Consumer:
        """A consumer for reading markers (no group, no commits)."""
        return _kafka(self.topic).Consumer({
            "bootstrap.servers": self.bootstrap_servers, "group.id": f"onceflow-sink-{self.topic}",
            "enable.auto.commit": False, "enable.partition.eof": True, "isolation.level": isolation_level,
        })

    def check_job(self, checkpoint: CheckpointConfig | None, restart: RestartStrategy) -> None:
        """Exactly once: refuse checkpoint settings under which the broker may time out a transaction.

        A transaction can wait for its commit up to ``(tolerable_failures + 1) *
        (interval_s + min_pause_s + timeout_s)``; ``transaction_timeout_s`` must
        be above that. ``restart`` does not enter it (see the module docstring);
        at least once, and a job without checkpoints, are not checked.

        Raises:
            PlanError: ``transaction_timeout_s`` is not above the bound; the message names both.

        Example:
            >>> from onceflow.checkpoint.config import CheckpointConfig
            >>> from onceflow.runtime.restart import RestartStrategy
            >>> sink = KafkaSink("localhost:9092", "out", transaction_timeout_s=60)
            >>> sink.check_job(CheckpointConfig(interval_s=1, timeout_s=30), RestartStrategy.default())
            >>> sink.check_job(CheckpointConfig(interval_s=1, timeout_s=60), RestartStrategy.default())
            Traceback (most recent call last):
            ...
            onceflow.errors.PlanError: kafka sink 'out': transaction_timeout_s (60 s) must be above ...

        """
        self._delivery.check_job(self, checkpoint)

    def prepare(self) -> None:
        """Check the output topic exists; create the marker topic (one partition) if it does not (exactly once).

        Raises:
            PlanError: confluent-kafka is missing, the broker does not answer, or the topic does not exist.

        """
        kafka = _kafka(self.topic)
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": self.bootstrap_servers})
        try:
            topics = admin.list_topics(timeout=self.timeout_s).topics
        except kafka.KafkaException as error:
            msg = f"kafka sink {self.topic!r}: no metadata from {self.bootstrap_servers} ({error}); check the brokers"
            raise PlanError(msg) from error
        if self.topic not in topics:
            msg = f"kafka sink: topic {self.topic!r} does not exist on {self.bootstrap_servers}; create it first"
            raise PlanError(msg)
        if self._delivery.writes_markers and self.marker_topic not in topics:
            for future in admin.create_topics([NewTopic(self.marker_topic, num_partitions=1)]).values():
                try:
                    future.result(timeout=self.timeout_s)
                except kafka.KafkaException as error:
                    if error.args[0].code() != kafka.KafkaError.TOPIC_ALREADY_EXISTS:
                        msg = (f"kafka sink {self.topic!r}: cannot create marker topic {self.marker_topic!r} "
                               f"({error}); create it with one partition")
                        raise PlanError(msg) from error

    def create_writer(self, ctx: SinkContext) -> SinkWriter[KafkaTransaction]:
        """Return the writer of ``ctx.subtask`` (:class:`KafkaSinkWriter`, or :class:`KafkaAtLeastOnceWriter`)."""
        return self._delivery.create_writer(self, ctx)

    def create_committer(self, ctx: SinkContext) -> Committer[KafkaTransaction]:
        """Return a committer (:class:`KafkaSinkCommitter`, or :class:`KafkaAtLeastOnceCommitter`)."""
        return self._delivery.create_committer(self, ctx)

    def read_committable(self, record: CommittableRecord, *, operator: str = "") -> KafkaTransaction:
        """Read a committable of this sink from a checkpoint (version 1)."""
        return KafkaTransaction.from_record(record, operator=operator)


class _Deliveries:
    """Delivery reports of one transaction: the first error and the marker's offset."""

    def __init__(self) -> None:
        self.error: Any = None
        self.marker_offset = -1

    def on_row(self, error: Any, _message: Any) -> None:
        if error is not None and self.error is None:
            self.error = error

    def on_marker(self, error: Any, message: Any) -> None:
        self.on_row(error, message)
        if error is None:
            self.marker_offset = message.offset()


def _produce_rows(producer: Producer, topic: str, key: str | None, batch: pa.RecordBatch | pa.Table,
                  deliveries: _Deliveries) -> None:
    keys = batch.column(key).to_pylist() if key is not None else None
    for i, row in enumerate(batch.to_pylist()):
        value = json.dumps(row, default=_json_default, separators=(",", ":")).encode()
        message_key = _message_key(keys[i]) if keys is not None else None
        produce_waiting(producer, topic, value, key=message_key, on_delivery=deliveries.on_row)
    producer.poll(0)


def _finish(producer: Producer, sink: KafkaSink, deliveries: _Deliveries, what: str) -> None:
    """Flush; raise if a message was not delivered."""
    left = producer.flush(sink.timeout_s)
    if left or deliveries.error is not None:
        reason = f"{left} message(s) not delivered within {sink.timeout_s} s" if left else str(deliveries.error)
        msg = f"kafka sink {sink.topic!r}: {what} failed ({reason}); the job restarts from its last checkpoint"
        raise SinkCommitError(msg)


@dataclass(slots=True)
class _OpenTransaction:
    index: int
    token: str
    deliveries: _Deliveries = field(default_factory=_Deliveries)
    batches: list[pa.RecordBatch] = field(default_factory=list)


class KafkaSinkWriter(SinkWriter[KafkaTransaction]):
    """Produces one subtask's rows into transactions of its producer pool."""

    def __init__(self, sink: KafkaSink, ctx: SinkContext) -> None:
        self._sink = sink
        self._ctx = ctx
        self._ids = [KafkaSink.transactional_id(ctx, k) for k in range(sink.producers)]
        self._producers = sink.producers_for(self._ids)
        self._open: _OpenTransaction | None = None
        self._lock = threading.Lock()
        self._free = list(range(sink.producers))
        """Indices of producers with no transaction (guarded by ``_lock``: commits hand them back)."""

    def write(self, batch: pa.RecordBatch) -> None:
        """Produce ``batch``'s rows into the open transaction (opened on a free producer if none)."""
        if batch.num_rows == 0:
            return
        if self._open is None:
            self._open = self._begin()
        _produce_rows(self._producers[self._open.index], self._sink.topic, self._sink.key, batch,
                      self._open.deliveries)
        self._open.batches.append(batch)

    def flush(self, end_of_input: bool) -> None:
        """Wait until the open transaction's rows reached the broker (still uncommitted)."""
        if self._open is not None:
            _finish(self._producers[self._open.index], self._sink, self._open.deliveries,
                    f"a write of {self._ids[self._open.index]}")

    def _begin(self) -> _OpenTransaction:
        with self._lock:
            if not self._free:
                msg = (f"kafka sink {self._ctx.operator}: all {self._sink.producers} producers of subtask "
                       f"{self._ctx.subtask} hold transactions waiting for their checkpoints to complete; "
                       "raise producers= (or checkpoint less often)")
                raise SinkCommitError(msg)
            index = self._free.pop(0)
        self._producers[index].begin_transaction()
        return _OpenTransaction(index, uuid.uuid4().hex)

    def prepare_commit(self, checkpoint_id: int | None = None) -> list[KafkaTransaction]:
        """Add the marker to the open transaction, flush, and return its committable (none without rows)."""
        if self._open is None:
            return []
        opened, self._open = self._open, None
        producer, txn = self._producers[opened.index], self._ids[opened.index]
        marker = KafkaTransaction(txn, checkpoint_id, opened.token, self._sink.topic, self._sink.key,
                                  self._sink.marker_topic, -1, b"")
        producer.produce(self._sink.marker_topic, marker.marker(), key=txn.encode(), partition=_MARKER_PARTITION,
                         on_delivery=opened.deliveries.on_marker)
        _finish(producer, self._sink, opened.deliveries, f"the pre-commit of {txn}")

        def release() -> None:
            with self._lock:
                self._free.append(opened.index)

        with _LIVE_LOCK:
            _LIVE[txn] = _Precommitted(producer, opened.token, release)
        return [KafkaTransaction(txn, checkpoint_id, opened.token, self._sink.topic, self._sink.key,
                                 self._sink.marker_topic, opened.deliveries.marker_offset, _rows_ipc(opened.batches))]

    def abort(self) -> None:
        """Abort the open transaction (pre-committed ones stay for their commit or for recovery)."""
        opened, self._open = self._open, None
        if opened is not None:
            self._producers[opened.index].abort_transaction(self._sink.timeout_s)
            with self._lock:
                self._free.append(opened.index)

    def close(self) -> None:
        """Let every producer go, ending no transaction: as a crashed process would.

        An open transaction stays open until recovery fences its id; a
        pre-committed one is committed by recovery (its commit no longer finds
        a live producer in this process).
        """
        with _LIVE_LOCK:
            for txn in self._ids:
                _LIVE.pop(txn, None)
        self._producers = []
        self._open = None


class KafkaSinkCommitter(Committer[KafkaTransaction]):
    """Commits live transactions; recovers the others from their committables, idempotently."""

    def __init__(self, sink: KafkaSink, ctx: SinkContext) -> None:
        self._sink = sink
        self._ctx = ctx

    def commit(self, committables: list[KafkaTransaction]) -> None:
        """Commit each transaction: by its live producer, or by recovery (fence, check the marker, replay)."""
        recover = []
        for committable in committables:
            live = self._take_live(committable)
            if live is None:
                recover.append(committable)
                continue
            try:
                live.producer.commit_transaction(self._sink.timeout_s)
            except _kafka(self._sink.topic).KafkaException as error:
                if error.args[0].retriable():
                    with _LIVE_LOCK:
                        _LIVE[committable.txn] = live
                msg = (f"kafka sink {self._ctx.operator}: the commit of {committable.txn} (checkpoint "
                       f"{committable.checkpoint}) failed ({error}); recovery produces it again from the checkpoint")
                raise SinkCommitError(msg) from error
            live.release()
        if recover:
            self._recover(recover, replay=True)

    def abort(self, committables: list[KafkaTransaction]) -> None:
        """Abort each transaction still open (a live one directly, the others by fencing their ids)."""
        fence = []
        for committable in committables:
            live = self._take_live(committable)
            if live is None:
                fence.append(committable)
                continue
            live.producer.abort_transaction(self._sink.timeout_s)
            live.release()
        if fence:
            self._recover(fence, replay=False)

    def abort_lingering(self, keep: list[KafkaTransaction]) -> None:
        """Fence every producer of this job's sink operator, aborting its open transaction.

        ``keep`` loses nothing by it: its rows are in the committables, and a
        commit of them produces them again if they were not committed.
        """
        self._recover(keep, replay=False)

    def lingering(self) -> list[str]:
        """The ids of this operator whose markers are in the marker partition's open (undecided) tail."""
        return sorted(self._open_marker_ids())

    def _take_live(self, committable: KafkaTransaction) -> _Precommitted | None:
        with _LIVE_LOCK:
            live = _LIVE.get(committable.txn)
            if live is None or live.token != committable.token:
                return None
            return _LIVE.pop(committable.txn)

    def _owns(self, txn: str) -> bool:
        fields = split_fields(txn, delimiter=":", count=_ID_FIELDS)
        mine = KafkaSink.transactional_id(self._ctx, 0).split(":")
        return fields is not None and fields[:3] == mine[:3] and fields[3].isdigit() and fields[4].isdigit()

    def _recover(self, committables: list[KafkaTransaction], *, replay: bool) -> None:
        """Fence every producer of the operator; with ``replay``, produce again each committable not committed."""
        subtasks = set(range(self._ctx.parallelism))
        ids = {c.txn for c in committables}
        for txn in ids | self._open_marker_ids():
            fields = split_fields(txn, delimiter=":", count=_ID_FIELDS)
            if fields is not None and self._owns(txn):
                subtasks.add(int(fields[3]))
        ids |= {KafkaSink.transactional_id(self._ctx, k, s) for s in subtasks for k in range(self._sink.producers)}
        fenced = dict(zip(sorted(ids), self._sink.producers_for(sorted(ids)), strict=True))
        log.info("kafka sink %s: fenced %d transactional id(s)", self._ctx.operator, len(fenced))
        if not replay:
            return
        done = self._committed(committables)
        for committable in committables:
            if committable.token in done:
                continue
            producer = fenced[committable.txn]
            deliveries = _Deliveries()
            producer.begin_transaction()
            _produce_rows(producer, committable.topic, committable.key, committable.table(), deliveries)
            producer.produce(committable.marker_topic, committable.marker(), key=committable.txn.encode(),
                             partition=_MARKER_PARTITION, on_delivery=deliveries.on_marker)
            _finish(producer, self._sink, deliveries, f"the replay of {committable.txn}")
            producer.commit_transaction(self._sink.timeout_s)
            log.info("kafka sink %s: produced %s (checkpoint %s) again from the checkpoint", self._ctx.operator,
                     committable.txn, committable.checkpoint)

    def _open_marker_ids(self) -> set[str]:
        """Ids of this operator with a marker between the marker partition's last stable offset and its end."""
        kafka = _kafka(self._sink.topic)
        partition = kafka.TopicPartition(self._sink.marker_topic, _MARKER_PARTITION)
        committed, uncommitted = self._sink.consumer(), self._sink.consumer("read_uncommitted")
        try:
            _, stable = committed.get_watermark_offsets(partition, timeout=self._sink.timeout_s, cached=False)
            _, high = uncommitted.get_watermark_offsets(partition, timeout=self._sink.timeout_s, cached=False)
            if stable >= high:
                return set()
            found = set()
            for message in self._read(uncommitted, self._sink.marker_topic, stable, high):
                txn = (message.key() or b"").decode(errors="replace")
                if self._owns(txn):
                    found.add(txn)
            return found
        finally:
            committed.close()
            uncommitted.close()

    def _committed(self, committables: list[KafkaTransaction]) -> set[str]:
        """The tokens of ``committables`` whose markers are visible to ``read_committed`` readers.

        Reads each marker partition once, from its first offset, after waiting
        (up to ``timeout_s``) until its last stable offset reaches the high
        watermark seen at the start, so every marker written before is
        decided. It starts at the first offset, not at the markers' own: a
        ``read_committed`` read that starts after an aborted transaction of a
        producer id must not be told about that transaction, or the client
        drops every later record of the id as aborted too. Apache Kafka
        leaves such transactions out of the fetch; the test broker (noida-db)
        does not, and every recovery aborts transactions of these very ids.
        """
        kafka = _kafka(self._sink.topic)
        found: set[str] = set()
        for topic in sorted({c.marker_topic for c in committables}):
            wanted = {(c.txn.encode(), c.token) for c in committables if c.marker_topic == topic}
            partition = kafka.TopicPartition(topic, _MARKER_PARTITION)
            committed, uncommitted = self._sink.consumer(), self._sink.consumer("read_uncommitted")
            try:
                _, high = uncommitted.get_watermark_offsets(partition, timeout=self._sink.timeout_s, cached=False)
                deadline = time.monotonic() + self._sink.timeout_s
                while True:
                    low, stable = committed.get_watermark_offsets(partition, timeout=self._sink.timeout_s,
                                                                  cached=False)
                    if stable >= high:
                        break
                    if time.monotonic() > deadline:
                        msg = (f"kafka sink {self._ctx.operator}: a transaction of another producer stays open in "
                               f"{topic!r} (last stable offset {stable} < {high}) for more than "
                               f"{self._sink.timeout_s} s, so whether the checkpoint's transactions committed "
                               "cannot be decided; the job restarts and checks again")
                        raise SinkCommitError(msg)
                    time.sleep(0.1)
                for message in self._read(committed, topic, low, stable):
                    pair = (message.key(), _token(message.value()))
                    if pair in wanted:
                        found.add(pair[1] or "")
                        wanted.discard(pair)
                        if not wanted:
                            break
            finally:
                committed.close()
                uncommitted.close()
        return found

    def _read(self, consumer: Consumer, topic: str, start: int, end: int) -> Iterable[Any]:
        """Messages of partition 0 of ``topic`` from ``start`` until offset ``end`` or the partition's end."""
        kafka = _kafka(topic)
        if start >= end:
            return
        consumer.assign([kafka.TopicPartition(topic, _MARKER_PARTITION, start)])
        deadline = time.monotonic() + self._sink.timeout_s
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                continue
            error = message.error()
            if error is not None:
                if error.code() == kafka.KafkaError._PARTITION_EOF:
                    return
                msg = f"kafka sink {self._ctx.operator}: reading markers of {topic!r} failed ({error})"
                raise SinkCommitError(msg)
            yield message
            if (message.offset() or 0) + 1 >= end:
                return
        msg = f"kafka sink {self._ctx.operator}: reading markers of {topic!r} took more than {self._sink.timeout_s} s"
        raise SinkCommitError(msg)


def _token(value: bytes | None) -> str | None:
    try:
        token = json.loads(value or b"{}").get("token")
    except ValueError:
        return None
    return token if isinstance(token, str) else None


class KafkaAtLeastOnceWriter(SinkWriter[KafkaTransaction]):
    """Produces one subtask's rows as they come with an idempotent producer; a barrier waits for their delivery."""

    def __init__(self, sink: KafkaSink, ctx: SinkContext) -> None:
        self._sink = sink
        self._ctx = ctx
        self._producer = sink.idempotent_producer()
        self._deliveries = _Deliveries()

    def write(self, batch: pa.RecordBatch) -> None:
        """Produce ``batch``'s rows (visible to readers once delivered)."""
        if batch.num_rows:
            _produce_rows(self._producer, self._sink.topic, self._sink.key, batch, self._deliveries)

    def flush(self, end_of_input: bool) -> None:
        """Wait until every row produced so far is on the broker.

        Raises:
            SinkCommitError: a row was not delivered (within ``timeout_s``, or with an error).

        """
        _finish(self._producer, self._sink, self._deliveries,
                f"a write of subtask {self._ctx.subtask} (at least once)")

    def prepare_commit(self, checkpoint_id: int | None = None) -> list[KafkaTransaction]:
        """Flush (raising if a row was not delivered), so the checkpoint covers only delivered rows; pre-commit nothing.

        Raises:
            SinkCommitError: a row was not delivered; the checkpoint fails and the job restarts from the last one.

        """
        self.flush(end_of_input=checkpoint_id is None)
        return []

    def abort(self) -> None:
        """Nothing to discard: rows already produced stay, and a replay produces the others again."""


class KafkaAtLeastOnceCommitter(Committer[KafkaTransaction]):
    """The committer of an at-least-once sink: there is nothing to commit, abort or fence.

    A checkpoint taken by the same sink with ``delivery="exactly_once"`` may
    still hold transactions; they are committed (or aborted) as
    :class:`KafkaSinkCommitter` would, so switching modes on a resume loses nothing.
    """

    def __init__(self, sink: KafkaSink, ctx: SinkContext) -> None:
        self._sink = sink
        self._ctx = ctx

    def commit(self, committables: list[KafkaTransaction]) -> None:
        """Commit transactions restored from an exactly-once checkpoint (none in this mode's own)."""
        if committables:
            KafkaSinkCommitter(self._sink, self._ctx).commit(committables)

    def abort(self, committables: list[KafkaTransaction]) -> None:
        """Abort transactions restored from an exactly-once checkpoint (none in this mode's own)."""
        if committables:
            KafkaSinkCommitter(self._sink, self._ctx).abort(committables)


class _Delivery(ABC):
    """What a delivery guarantee decides for a :class:`KafkaSink`: its writer, committer, topics and job check."""

    writes_markers: ClassVar[bool]
    """Whether the sink needs its marker topic."""

    @abstractmethod
    def create_writer(self, sink: KafkaSink, ctx: SinkContext) -> SinkWriter[KafkaTransaction]:
        """The writer of ``ctx.subtask``."""

    @abstractmethod
    def create_committer(self, sink: KafkaSink, ctx: SinkContext) -> Committer[KafkaTransaction]:
        """A committer."""

    @abstractmethod
    def check_job(self, sink: KafkaSink, checkpoint: CheckpointConfig | None) -> None:
        """Refuse checkpoint settings this guarantee cannot keep."""


class _ExactlyOnce(_Delivery):
    writes_markers = True

    def create_writer(self, sink: KafkaSink, ctx: SinkContext) -> KafkaSinkWriter:
        return KafkaSinkWriter(sink, ctx)

    def create_committer(self, sink: KafkaSink, ctx: SinkContext) -> KafkaSinkCommitter:
        return KafkaSinkCommitter(sink, ctx)

    def check_job(self, sink: KafkaSink, checkpoint: CheckpointConfig | None) -> None:
        if checkpoint is None:
            return
        per_checkpoint = checkpoint.interval_s + checkpoint.min_pause_s + checkpoint.timeout_s
        bound = (checkpoint.tolerable_failures + 1) * per_checkpoint
        if sink.transaction_timeout_s > bound:
            return
        msg = (f"kafka sink {sink.topic!r}: transaction_timeout_s ({sink.transaction_timeout_s:g} s) must be above "
               f"the longest a transaction can wait for its checkpoint, {bound:g} s = (tolerable_failures "
               f"{checkpoint.tolerable_failures} + 1) x (interval_s {checkpoint.interval_s:g} + min_pause_s "
               f"{checkpoint.min_pause_s:g} + timeout_s {checkpoint.timeout_s:g}), or the broker may abort it; "
               "raise transaction_timeout_s (the broker caps it at transaction.max.timeout.ms, 15 min by default) "
               "or shorten the checkpoint interval_s or timeout_s")
        raise PlanError(msg)


class _AtLeastOnce(_Delivery):
    writes_markers = False

    def create_writer(self, sink: KafkaSink, ctx: SinkContext) -> KafkaAtLeastOnceWriter:
        return KafkaAtLeastOnceWriter(sink, ctx)

    def create_committer(self, sink: KafkaSink, ctx: SinkContext) -> KafkaAtLeastOnceCommitter:
        return KafkaAtLeastOnceCommitter(sink, ctx)

    def check_job(self, sink: KafkaSink, checkpoint: CheckpointConfig | None) -> None:
        """No transaction waits for a checkpoint: any settings do."""


_DELIVERIES: dict[str, _Delivery] = {"exactly_once": _ExactlyOnce(), "at_least_once": _AtLeastOnce()}
"""``delivery=`` -> its strategy."""
