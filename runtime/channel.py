"""Sequenced, credit-based channels between subtasks (sans-IO).

Every message on a channel carries ``(channel, seq)``. The receiver applies
messages in sequence order and drops a sequence it has already applied,
whatever order or how many times Ray delivers them. The sender keeps at most
``credits`` unacknowledged messages per channel; a message is acknowledged when
the receiver has *processed* it, so a slow consumer holds back its producers
and backpressure reaches the sources.

Nothing here imports Ray: the actor moves :class:`ChannelMessage` objects and
asks these classes what to do.

Example:
    >>> receiver = ChannelReceiver()
    >>> [m.seq for m in receiver.accept(ChannelMessage(0, 1))]
    []
    >>> [m.seq for m in receiver.accept(ChannelMessage(0, 0))]
    [0, 1]
    >>> receiver.accept(ChannelMessage(0, 1))  # a duplicate is dropped
    []

"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa

from onceflow.errors import DataError
from onceflow.runtime.plan import Routing

if TYPE_CHECKING:
    from collections.abc import Sequence

    from onceflow.runtime.plan import PhysicalPlan

__all__ = [
    "CHANNEL_STATE",
    "INPUT_WATERMARKS",
    "ChannelMessage",
    "ChannelReceiver",
    "ChannelSender",
    "InputWatermarks",
    "channel_state_table",
    "input_channel_names",
    "read_channel_state",
]

NO_WATERMARK = -(2**63)
END_OF_TIME = 2**63 - 1

INPUT_WATERMARKS = "@input_watermarks"
"""The runtime entry of a subtask's snapshot that holds its input channels' watermarks."""

CHANNEL_STATE = "@channel_state"
"""The runtime entry of an unaligned snapshot that holds the messages in flight (see :func:`channel_state_table`)."""

_CHANNEL_STATE_SCHEMA = pa.schema(
    [("channel", pa.int32()),
     ("watermarks", pa.list_(pa.struct([("rows", pa.int64()), ("watermark", pa.int64())]))),
     ("batch", pa.binary())],
    metadata={"onceflow.state": "channel_state", "onceflow.version": "1"},
)

_INPUT_WATERMARKS_SCHEMA = pa.schema(
    [("channel", pa.int32()), ("name", pa.string()), ("watermark", pa.int64()), ("ended", pa.bool_())],
    metadata={"onceflow.state": "input_watermarks", "onceflow.version": "1"},
)


@dataclass(frozen=True, slots=True)
class ChannelMessage:
    """One message on a channel.

    Attributes:
        channel: the channel's index among the receiver's inputs.
        seq: the message's sequence number on its channel, from 0.
        batch: the records, or ``None`` for a control-only message.
        watermarks: ``(rows, watermark)`` pairs in order: the sender's watermark
            advanced to ``watermark`` after the first ``rows`` rows of ``batch``.
            Keeping the position makes coalescing batches never move a
            watermark ahead of (or behind) the rows it followed.
        barrier: ``(checkpoint id, trigger time)`` after the rows and watermarks.
        eof: the end of the channel's data (barriers may still follow).
    """

    channel: int
    seq: int
    batch: pa.RecordBatch | None = None
    watermarks: tuple[tuple[int, int], ...] = ()
    barrier: tuple[int, float] | None = None
    eof: bool = False


class ChannelReceiver:
    """Puts one channel's messages back in sequence order, dropping repeats."""

    __slots__ = ("_early", "duplicates", "expected")

    def __init__(self) -> None:
        self.expected = 0
        self.duplicates = 0
        self._early: dict[int, ChannelMessage] = {}

    def accept(self, message: ChannelMessage) -> list[ChannelMessage]:
        """Take a delivered message; return the messages now ready, in order."""
        if message.seq < self.expected or message.seq in self._early:
            self.duplicates += 1
            return []
        if message.seq > self.expected:
            self._early[message.seq] = message
            return []
        ready = [message]
        self.expected += 1
        while self.expected in self._early:
            ready.append(self._early.pop(self.expected))
            self.expected += 1
        return ready

    @property
    def waiting(self) -> int:
        """Messages that arrived early and wait for a gap to fill."""
        return len(self._early)


class ChannelSender:
    """Numbers one channel's messages and accounts for its credits.

    Args:
        credits: the most unacknowledged messages the channel may carry.

    """

    __slots__ = ("credits", "next_seq", "unacked")

    def __init__(self, credits: int) -> None:
        if credits < 1:
            msg = f"a channel needs at least one credit, got {credits}"
            raise ValueError(msg)
        self.credits = credits
        self.next_seq = 0
        self.unacked = 0

    def has_credit(self) -> bool:
        """Whether another message may be sent now."""
        return self.unacked < self.credits

    def on_send(self) -> int:
        """Record a send; return the message's sequence number."""
        seq = self.next_seq
        self.next_seq += 1
        self.unacked += 1
        return seq

    def on_ack(self) -> None:
        """Record that the receiver processed the oldest unacknowledged message."""
        if self.unacked == 0:
            msg = "acknowledgement without an unacknowledged message"
            raise RuntimeError(msg)
        self.unacked -= 1


@dataclass(frozen=True, slots=True)
class _SavedChannels:
    """One snapshot table of :class:`InputWatermarks`, in channel order."""

    names: list[str]
    last: list[int]
    ended: list[bool]

    @property
    def combined(self) -> int:
        """The minimum over the channels, an ended one counting as the end of time."""
        return min(END_OF_TIME if ended else last for last, ended in zip(self.last, self.ended, strict=True))


class InputWatermarks:
    """Tracks the watermark of every input channel; the operator's is their minimum.

    A channel that ended counts as the end of time, so a finished input never
    holds event time back.

    The per-channel watermarks are part of the subtask's snapshot
    (:meth:`snapshot`, restored by :meth:`restore`), each channel named by its
    sender (:func:`input_channel_names`). Restoring only the combined
    watermark would not do: after a restore the inputs send their watermarks
    again in any order, and a minimum over channels whose values are unknown
    (or a floor under them) differs from the failure-free run until every
    input has spoken. With inputs at 99 and 9, say, the combined watermark is 9;
    when the second input moves to 149, the failure-free run's minimum is 99,
    while a restored subtask that does not know the first input's 99 stays at 9
    and takes a row at 55 that the failure-free run sends to the late output.

    A channel restored as ended opens again at its last watermark if rows or a
    newer watermark arrive on it: a job resumed from a checkpoint taken after
    its input ended (``resume=True`` after a bounded run) may read more. Only
    then can :attr:`current` go back.

    Example:
        >>> marks = InputWatermarks(2)
        >>> marks.update(0, 99), marks.update(1, 9)
        (None, 9)
        >>> restored = InputWatermarks(2)
        >>> restored.restore(marks.snapshot())
        >>> restored.current, restored.update(1, 149)
        (9, 99)

    Args:
        channels: the number of input channels.
        names: each channel's sender (``<operator uid>:<port>/<subtask>``); by
            default the channel indexes.
        operator: the subtask, for error messages.

    """

    __slots__ = ("_last", "_per_channel", "current", "names", "operator")

    def __init__(self, channels: int, names: Sequence[str] | None = None, *, operator: str = "") -> None:
        self.names = list(names) if names is not None else [str(channel) for channel in range(channels)]
        if len(self.names) != channels:
            msg = f"{operator or 'input watermarks'}: {len(self.names)} channel names for {channels} channels"
            raise ValueError(msg)
        self.operator = operator
        self._per_channel = [NO_WATERMARK] * channels
        self._last = [NO_WATERMARK] * channels  # the watermark before END_OF_TIME, for a channel that reopens
        self.current = NO_WATERMARK if channels else END_OF_TIME

    def update(self, channel: int, watermark: int) -> int | None:
        """Record ``channel``'s watermark; return the new minimum if it advanced."""
        if self._per_channel[channel] == END_OF_TIME and self._last[channel] < watermark < END_OF_TIME:
            self._reopen(channel)
        if watermark <= self._per_channel[channel]:
            return None
        self._per_channel[channel] = watermark
        if watermark < END_OF_TIME:
            self._last[channel] = watermark
        low = min(self._per_channel)
        if low > self.current:
            self.current = low
            return low
        return None

    def on_rows(self, channel: int) -> None:
        """Rows arrived on ``channel``: if it was restored as ended, it opens again."""
        if self._per_channel[channel] == END_OF_TIME:
            self._reopen(channel)

    def _reopen(self, channel: int) -> None:
        self._per_channel[channel] = self._last[channel]
        self.current = min(self._per_channel)

    def snapshot(self) -> pa.Table:
        """Return one row per channel: its index, sender name, last watermark (null: none yet) and whether it ended."""
        return pa.table(
            [
                pa.array(range(len(self.names)), pa.int32()),
                pa.array(self.names, pa.string()),
                pa.array([None if w == NO_WATERMARK else w for w in self._last], pa.int64()),
                pa.array([w == END_OF_TIME for w in self._per_channel], pa.bool_()),
            ],
            schema=_INPUT_WATERMARKS_SCHEMA,
        )

    def restore(self, state: pa.Table | Sequence[pa.Table]) -> None:
        """Set every channel from :meth:`snapshot` tables.

        Exact when every table names the same channels as this subtask: one
        table is the same subtask's snapshot; several (a rescaled vertex gets
        one per old subtask) agree per sender, as aligned barriers give every
        subtask the same watermarks, and each channel takes their minimum.
        Otherwise the senders changed (an input was rescaled), and every
        channel restarts at the lowest combined watermark of the tables:
        conservative, so no row is late by mistake; the inputs' next
        watermarks move it on.

        Raises:
            DataError: a table is not input watermark state.
        """
        tables = [state] if isinstance(state, pa.Table) else list(state)
        saved = [self._read(table) for table in tables if table.num_rows]
        if not saved or not self.names:
            return
        if all(old.names == self.names for old in saved):
            for channel in range(len(self.names)):
                self._last[channel] = min(old.last[channel] for old in saved)
                self._per_channel[channel] = min(
                    END_OF_TIME if old.ended[channel] else old.last[channel] for old in saved
                )
        else:
            low = min(old.combined for old in saved)
            # Every old channel ended: should an input go on, it goes on from the lowest watermark any had.
            floor = min(w for old in saved for w in old.last) if low == END_OF_TIME else low
            self._per_channel = [low] * len(self.names)
            self._last = [floor] * len(self.names)
        self.current = min(self._per_channel)

    def _read(self, table: pa.Table) -> _SavedChannels:
        metadata = table.schema.metadata or {}
        missing = [name for name in _INPUT_WATERMARKS_SCHEMA.names if name not in table.column_names]
        if metadata.get(b"onceflow.state") != b"input_watermarks" or missing:
            msg = (
                f"subtask {self.operator!r}: the {INPUT_WATERMARKS!r} entry of the restored checkpoint is not "
                "input watermark state; restore from a checkpoint that onceflow wrote for this job"
            )
            raise DataError(msg, operator=self.operator)
        ordered = table.sort_by("channel")
        names = [str(name) for name in ordered.column("name").to_pylist()]
        last = [NO_WATERMARK if w is None else int(w) for w in ordered.column("watermark").to_pylist()]
        ended = [bool(e) for e in ordered.column("ended").to_pylist()]
        return _SavedChannels(names, last, ended)


def input_channel_names(plan: PhysicalPlan, vertex: int, subtask: int) -> list[str]:
    """Name each input channel of ``subtask`` of ``vertex`` by its sender: ``<operator uid>:<port>/<subtask>``.

    A restore compares these names to decide whether a snapshot's channels are
    this subtask's channels (see :meth:`InputWatermarks.restore`).
    """
    names = [""] * plan.vertices[vertex].input_channels
    for upstream in plan.vertices:
        for spec in upstream.outputs:
            if spec.target != vertex:
                continue
            sender = f"{upstream.nodes[spec.stage].uid}:{spec.port}"
            if spec.routing is Routing.FORWARD:
                names[spec.channel_base] = f"{sender}/{subtask}"
            else:
                for index in range(upstream.parallelism):
                    names[spec.channel_base + index] = f"{sender}/{index}"
    return names


def channel_state_table(messages: Sequence[ChannelMessage], *, subtask: int = 0, parallelism: int = 1) -> pa.Table:
    """The channel state of an unaligned snapshot as Arrow: one row per message, in processing order.

    Each row holds the message's channel, its watermark marks and its rows (an
    Arrow IPC stream, so channels of different schemas fit in one table). The
    schema's metadata names the subtask that recorded it (``subtask`` of
    ``parallelism``), so a restore at another parallelism can re-route the rows.

    Example:
        >>> table = channel_state_table([ChannelMessage(1, 4, pa.record_batch({"x": [7]}), ((1, 30),))])
        >>> [(m.channel, m.batch.to_pylist(), m.watermarks) for m in read_channel_state(table)]
        [(1, [{'x': 7}], ((1, 30),))]

    """
    blobs: list[bytes | None] = []
    for message in messages:
        if message.batch is None:
            blobs.append(None)
            continue
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, message.batch.schema) as writer:
            writer.write_batch(message.batch)
        blobs.append(sink.getvalue().to_pybytes())
    owner = {b"onceflow.subtask": str(subtask).encode(), b"onceflow.parallelism": str(parallelism).encode()}
    return pa.table(
        [pa.array([m.channel for m in messages], pa.int32()),
         pa.array([[{"rows": r, "watermark": w} for r, w in m.watermarks] for m in messages],
                  _CHANNEL_STATE_SCHEMA.field("watermarks").type),
         pa.array(blobs, pa.binary())],
        schema=_CHANNEL_STATE_SCHEMA.with_metadata({**(_CHANNEL_STATE_SCHEMA.metadata or {}), **owner}),
    )


def read_channel_state(table: pa.Table, *, operator: str = "") -> list[ChannelMessage]:
    """The messages of :func:`channel_state_table` (sequence numbers are meaningless: replay does not use them).

    Raises:
        DataError: the table is not channel state.
    """
    metadata = table.schema.metadata or {}
    if metadata.get(b"onceflow.state") != b"channel_state":
        msg = (f"subtask {operator!r}: the {CHANNEL_STATE!r} entry of the restored checkpoint is not channel "
               "state; restore from a checkpoint that onceflow wrote for this job")
        raise DataError(msg, operator=operator)
    messages = []
    for seq, row in enumerate(table.to_pylist()):
        batch = None
        if row["batch"] is not None:
            batch = pa.ipc.open_stream(row["batch"]).read_next_batch()
        marks = tuple((int(m["rows"]), int(m["watermark"])) for m in row["watermarks"] or [])
        messages.append(ChannelMessage(int(row["channel"]), seq, batch, marks))
    return messages
