"""The simulated world: actors, channels, the coordinator, the job driver, all in one thread.

The job is small on purpose: two sources of replayable integer keys, a keyed
counting operator of parallelism 2 behind a hash exchange (key modulo 2), and
a sink of parallelism 2 that writes ``(key, count)`` rows into a
:class:`~tests.simulation.store.TransactionalStore` in transactions, prepares
them on every barrier and commits them when the checkpoint completes. Its
failure-free output is therefore known without running it: every key ``k``
seen ``n`` times gives the rows ``(k, 1) .. (k, n)``, once each.

The protocol pieces are the real ones: :class:`~onceflow.checkpoint.supervisor.JobSupervisor`
decides the lifecycle, :class:`~onceflow.checkpoint.coordinator.CheckpointCoordinator`
the checkpoints and :class:`~onceflow.runtime.input_gate.InputGate` a subtask's
channels (order, repeats, barrier alignment, end of input). Around them the world models what the Ray side does
(``runtime/job.py``'s driver, ``runtime/checkpointing.py``'s coordinator actor,
``runtime/subtask.py``'s subtasks): actor calls are messages in per-caller
FIFO queues, a call to a dead actor fails, ``ray.kill`` lands some steps after
it was sent, and blocking driver steps are generators that wait for a
condition. Nothing moves unless the scheduler says so (:meth:`World.moves`).

A loop job (``Job(loop=True)``) closes a cycle: the counting operator is the
loop head and its body. A source value ``v`` is the key ``v % BASE`` with
``v // BASE`` rounds left; a counting subtask counts a pass of the key, sends
``(key, count)`` to its sink and, while rounds are left, sends the value with
one round fewer (and the key moved on by the round's parity, see
:func:`passes`) round the loop to ``count[key % 2]``: itself or the other
subtask. Its gate is the real :class:`InputGate` with the two feedback
channels last (``feedback=2``); a push on one of them is received at once and
processed in a later step (``runtime/subtask.py`` spawns the processing), so
messages come round between a head's snapshot and the barrier that follows
them (the snapshot's channel state). The driver asks the counting subtasks for
their :class:`~onceflow.runtime.loops.LoopStatus` round after round, as
``runtime/job.py``'s ``_LoopWatch`` does, and feeds the real
:class:`~onceflow.runtime.loops.LoopTermination`; once it says the loop is
empty, it tells the heads to end their output.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from onceflow.checkpoint.config import CheckpointConfig
from onceflow.checkpoint.coordinator import (
    AbortCheckpoint,
    CheckpointAction,
    CheckpointCoordinator,
    DiscardCheckpoint,
    FailJob,
    NotifyCheckpointComplete,
    PersistCheckpoint,
    TaskAck,
    TriggerCheckpoint,
)
from onceflow.checkpoint.supervisor import (
    CancelRequested,
    DeployAttempt,
    Deployed,
    Failed,
    FenceAttempt,
    Fenced,
    FinalCheckpointCompleted,
    Finish,
    InputEnded,
    JobSupervisor,
    ResolveSinks,
    RestartDue,
    ScheduleRestart,
    SinkEnd,
    SinksResolved,
    StopRequested,
    StopSources,
    SupervisorAction,
    SupervisorEvent,
    TakeFinalCheckpoint,
)
from onceflow.runtime.channel import ChannelMessage
from onceflow.runtime.input_gate import (
    BarrierAligned,
    ChannelStateRecorded,
    EndOfInput,
    InputGate,
    Rows,
    UnalignedSnapshot,
)
from onceflow.runtime.loops import LoopStatus, LoopTermination
from onceflow.runtime.restart import RestartStrategy
from tests.simulation.chooser import Chooser
from tests.simulation.store import ManifestStorage, ManifestWrite, TransactionalStore

__all__ = ["BASE", "LOOP_EVENTS", "Call", "Coordinator", "Driver", "Job", "LoopWatch", "SimActor", "Subtask", "World",
           "passes"]

PARALLELISM = 2
SOURCE, COUNT, SINK = "src", "count", "sink"
FEEDBACK = "loop"
"""The rows a counting subtask sends round the loop: values, as a source's."""
_ROW = {SOURCE: pa.int64(), COUNT: pa.list_(pa.int64(), 2), FEEDBACK: pa.int64()}
"""The Arrow type of the rows each sending operator puts on its channels: keys, then ``(key, count)``."""
BASE = 100
"""A value ``v`` of a loop job is the key ``v % BASE`` with ``v // BASE`` rounds left."""
LOOP_EVENTS = tuple(tuple(k + BASE * (k % 4) for k in keys) for keys in ((0, 1, 2, 7), (1, 2, 4, 3)))
"""What the sources of a loop job read: keys with ``key % 4`` rounds to go (up to three).

A limit: no message that came round the loop fans out into messages to both subtasks (a message from
one subtask to the other never holds two values whose next keys differ in parity), and fooling a
detector that trusts a single quiet round needs that; the sweep does not catch such a detector."""
ALIGNED_TIMEOUT_S = 0.1
"""The alignment timeout of the ``"timeout"`` mode, in simulated seconds (a tick is 0.1 or 0.3 s)."""
CHANNEL_STATE = "@channel"
"""The snapshot entry of an unaligned snapshot's in-flight messages: ``[(channel, rows), ...]``."""
DEFERRED = object()
"""A handler's return value meaning: the call completes later (the handler keeps it)."""


def route(value: int) -> int:
    """The counting subtask of a value's key (the hash exchange, and the loop's feedback edge)."""
    return value % BASE % PARALLELISM


def next_round(value: int) -> int | None:
    """What a pass of ``value`` sends round the loop: one round fewer, the key moved on by its parity."""
    key, rounds = value % BASE, value // BASE
    return key + rounds % 2 + BASE * (rounds - 1) if rounds else None


def passes(value: int) -> list[int]:
    """The keys counted, in order, for a value from the time it enters the counting operator."""
    keys = []
    current: int | None = value
    while current is not None:
        keys.append(current % BASE)
        current = next_round(current)
    return keys


@dataclass(frozen=True, slots=True)
class Job:
    """What one simulated job reads and how it is configured.

    Attributes:
        events: per source subtask, the keys it reads, in order (replayable from any offset).
        config: the checkpoint settings given to the real coordinator.
        restart: the restart strategy given to the real supervisor.
        fence_waits_for_manifests: the coordinator's ``fence()`` waits for manifest writes in
            flight (``False`` models the race of a completion landing after recovery chose).
        mode: ``"aligned"`` barriers; ``"unaligned"`` ones, which overtake the messages queued
            before them (their channel state is recorded and replayed on restore); or
            ``"timeout"``: aligned, switching to unaligned after :data:`ALIGNED_TIMEOUT_S`.
        loop: the counting operator closes a loop (see the module docstring); ``events`` are values.
        feedback: a loop head's gate declares its feedback channels (``False`` builds it with
            ``feedback=0``: it aligns barriers over them too, and deadlocks).
    """

    events: tuple[tuple[int, ...], ...] = ((0, 1, 2, 0), (1, 2, 1, 3))
    config: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(interval_s=0.2, timeout_s=1.0,
                                                                              retain=2))
    restart: RestartStrategy = field(default_factory=lambda: RestartStrategy.fixed_delay(attempts=3, delay_s=0.2))
    fence_waits_for_manifests: bool = True
    mode: str = "aligned"
    loop: bool = False
    feedback: bool = True

    def expected(self, offsets: tuple[int, ...] | None = None) -> collections.Counter[tuple[int, int]]:
        """The committed rows of a run that read each source up to ``offsets`` (all of it by default).

        Every pass of a key (a value read, or one that came round the loop) counts it once.
        """
        seen: collections.Counter[int] = collections.Counter()
        for source, values in enumerate(self.events):
            for value in values[: len(values) if offsets is None else offsets[source]]:
                seen.update(passes(value))
        return collections.Counter((key, count) for key, n in seen.items() for count in range(1, n + 1))


class Call:
    """An actor call's outcome, as a Ray object reference would give it."""

    __slots__ = ("done", "error", "value")

    def __init__(self) -> None:
        self.done = False
        self.error: str | None = None
        self.value: Any = None

    def resolve(self, value: Any) -> None:
        if not self.done:
            self.done, self.value = True, value

    def fail(self, error: str) -> None:
        if not self.done:
            self.done, self.error = True, error


@dataclass(slots=True)
class Message:
    """A method call in flight from one caller to one actor."""

    target: SimActor
    method: str
    args: tuple[Any, ...]
    call: Call | None


class SimActor:
    """A simulated Ray actor: alive until it crashes or a kill lands; its handlers run one message at a time."""

    kind = "actor"

    def __init__(self, world: World, name: str, attempt: int) -> None:
        self.world = world
        self.name = name
        self.attempt = attempt
        self.alive = True
        self.doomed = False  # ray.kill was sent; it lands later
        self.broken = False  # failed for good (bad data): alive, but its watch raises and it does nothing
        self.deferred: list[Call] = []
        self.current: Call | None = None
        world.actors.append(self)

    def die(self) -> None:
        """The process ends: pending calls to it fail."""
        if not self.alive:
            return
        self.alive = False
        self.world.on_death(self)
        for call in self.deferred:
            call.fail(f"{self.name} died")
        self.deferred.clear()

    def __repr__(self) -> str:
        return f"{self.name}@{self.attempt}"


class Subtask(SimActor):
    """One subtask actor: a source, a counting subtask or a sink subtask (as ``runtime/subtask.py``).

    Its channels go through the real input gate.
    """

    def __init__(self, world: World, operator: str, index: int, attempt: int, run: str,
                 coordinator: Coordinator, restore: dict[str, Any] | None) -> None:
        super().__init__(world, f"{operator}/{index}", attempt)
        self.kind = operator
        self.index = index
        self.run = run
        self.coordinator = coordinator
        self.task = self.name
        job = world.job
        sources = len(job.events)
        self.loop = job.loop and operator == COUNT  # a loop head (and its body)
        self.loop_inputs = range(sources, sources + PARALLELISM) if self.loop else range(0)
        """The input channels that come round the loop, from count/0 and count/1."""
        self.inputs = 0 if operator == SOURCE else (sources + len(self.loop_inputs) if operator == COUNT else 1)
        timeout = ALIGNED_TIMEOUT_S if job.mode == "timeout" else None
        feedback = len(self.loop_inputs) if job.feedback else 0
        self.gate = InputGate(self.inputs, clock=world.now, aligned_timeout_s=timeout,
                              feedback=feedback) if self.inputs else None
        self.pending_ack: tuple[int, dict[str, Any]] | None = None  # a snapshot awaiting its channel state
        self.recording_aligned = False  # that snapshot is a loop head's aligned one (BarrierAligned.channel_state)
        if self.gate is not None and restore and restore.get(CHANNEL_STATE):
            self.gate.replay([ChannelMessage(channel, 0, pa.record_batch({"row": pa.array(rows, _ROW[sender])}))
                              for channel, sender, rows in restore[CHANNEL_STATE]])
            looped = sum(len(rows) for channel, _, rows in restore[CHANNEL_STATE] if channel in self.loop_inputs)
            if looped:
                world.stats["loop channel state replayed"] += 1
                world.log(f"  {self.name} replays {looped} rows that were coming round the loop")
        self.outputs: list[Subtask] = []
        self.channels: list[int] = []  # per output, the channel it is at the receiver
        self.sent: list[int] = []
        self.loop_closed = False  # end_loop came: the output ended; only the end may come round now
        self.acked: list[int] = []
        self.early_barriers: list[int] = []  # checkpoints whose barrier came round before this head aligned
        self.connected = False
        self.waiting_pushes: list[Call] = []  # pushes that arrived before connect(); they return after it
        self.running = False
        self.stop_requested = False
        self.ended = False
        self.last_barrier = 0
        state = restore.get(operator) if restore else None
        self.offset: int = state if operator == SOURCE and state is not None else 0
        self.counts: dict[int, int] = dict(state) if operator == COUNT and state is not None else {}
        # A sink starts with nothing uncommitted: the job resolved the restored transactions before deploying.
        self.open_txn: str | None = None
        self.txn_seq = 0
        self.uncommitted: dict[int, list[str]] = {}

    # -- wiring and control ---------------------------------------------------------------

    def on_connect(self, downstream: list[Subtask]) -> str:
        """Outputs: the next operator's subtasks (a loop head: its sink, then count/0 and count/1)."""
        self.outputs = downstream
        sources = len(self.world.job.events)
        self.channels = [self.index if self.kind == SOURCE else (0 if output == 0 else sources + self.index)
                         for output in range(len(downstream))]
        self.sent = [0] * len(downstream)
        self.connected = True
        # runtime/subtask.py processes input only once connected; a restored one then replays at once.
        if self.gate is not None and not self.gate.idle:
            self._drain()
        for call in self.waiting_pushes:
            call.resolve(True)
        self.waiting_pushes.clear()
        return self.name

    def on_run(self) -> None:
        self.running = True

    def on_stop(self) -> None:
        self.stop_requested = True

    # -- data plane -------------------------------------------------------------------------

    def _send_barrier(self, output: int, checkpoint_id: int, *, unaligned: bool) -> None:
        """In-band behind the rows sent before it, or (unaligned) as a call of its own that overtakes them."""
        if not unaligned:
            self._send(output, barrier=checkpoint_id)
            return
        self.world.send(self, self.outputs[output], "barrier", self.channels[output], checkpoint_id,
                        self.sent[output] - 1)

    def _send(self, output: int, rows: tuple[Any, ...] = (), *, barrier: int = 0, eof: bool = False) -> None:
        if not self.connected:
            # runtime/subtask.py's _send hands outputs to the output gates of their port: none before connect().
            self.world.stats["sent before connected"] += 1
            lost = rows or ("barrier" if barrier else "end")
            self.world.log(f"  LOST: {self} is not connected yet; its output {lost} goes nowhere")
            return
        target = self.outputs[output]
        channel = self.channels[output]
        row_type = _ROW[FEEDBACK if self.loop and output else self.kind]
        batch = pa.record_batch({"row": pa.array(rows, row_type)}) if rows else None
        message = ChannelMessage(channel, self.sent[output], batch, barrier=(barrier, 0.0) if barrier else None,
                                 eof=eof)
        self.sent[output] += 1
        self.world.send(self, target, "push", message)

    def source_step(self) -> None:
        """Read the next batch (one or two keys) and route it by key, or end the input."""
        keys = self.world.job.events[self.index]
        if self.stop_requested or self.offset >= len(keys):
            self._end_of_input()
            return
        n = 1 + self.world.chooser.choose(2)
        batch = keys[self.offset: self.offset + n]
        self.offset += len(batch)
        for output in range(len(self.outputs)):
            rows = tuple(v for v in batch if route(v) == output)
            if rows:
                self._send(output, rows)

    def _end_of_input(self) -> None:
        for output in range(len(self.outputs)):
            self._send(output, eof=True)
        self.ended = True
        self.running = False

    def on_push(self, message: ChannelMessage) -> Any:
        assert self.gate is not None
        self.gate.receive(message)
        if not self.connected and message.channel not in self.loop_inputs:
            # A peer wired (and replaying) first: the call waits for connect() before processing.
            if self.current is not None:
                self.deferred.append(self.current)
                self.waiting_pushes.append(self.current)
            return DEFERRED
        if message.channel in self.loop_inputs:
            if message.barrier is not None and message.barrier[0] > self.last_barrier:
                # The barrier came round before this head aligned its input for it (it snapshots later).
                self.world.stats["loop barrier before the head aligned"] += 1
                self.early_barriers.append(message.barrier[0])
            # Round a loop: the call returns (gives the credit back) on arrival; processing is spawned.
            self.world.send(self, self, "process")
            return True
        self._drain()
        return True

    def on_process(self) -> None:
        """The processing a push round the loop spawned: it waits for the lock (and connect()), then drains."""
        if self.connected:
            self._drain()

    def on_barrier(self, channel: int, checkpoint_id: int, last_seq: int) -> None:
        """An unaligned barrier, after ``last_seq`` on ``channel``."""
        assert self.gate is not None
        self.gate.receive_barrier(channel, checkpoint_id, 0.0, last_seq)
        if self.connected:
            self._drain()

    def on_tick(self) -> None:
        """The subtask's timer: an alignment may have run past its timeout (``OperatorSubtask._tick`` processes
        only then: with an alignment timeout)."""
        if self.gate is not None and self.gate.aligned_timeout_s is not None and self.connected:
            self._drain()

    def _drain(self) -> None:
        """Process what the real input gate hands out: rows, barriers, channel state, the end of input."""
        assert self.gate is not None
        for event in self.gate.drain():
            if isinstance(event, Rows):
                if self.loop_closed:
                    self.world.violation(f"{self}: rows came round the loop after it ended (end_loop): "
                                         f"{event.batch.column('row').to_pylist()}")
                self._apply(event.batch.column("row").to_pylist())
            elif isinstance(event, BarrierAligned) and event.channel_state:
                # A loop head: snapshot and forward the barrier now; acknowledge once what comes round until
                # the barrier does is recorded (ChannelStateRecorded).
                self.pending_ack = (event.checkpoint_id, self._snapshot(event.checkpoint_id, acknowledge=False))
                self.recording_aligned = True
                self.world.log(f"  {self} records what comes round the loop for checkpoint {event.checkpoint_id}")
            elif isinstance(event, BarrierAligned):
                self._snapshot(event.checkpoint_id)
            elif isinstance(event, UnalignedSnapshot):
                # Unaligned from here on: a subtask whose alignment timed out sends unaligned barriers too.
                self.pending_ack = (event.checkpoint_id, self._snapshot(event.checkpoint_id, acknowledge=False,
                                                                        unaligned=True))
                self.recording_aligned = False
            elif isinstance(event, ChannelStateRecorded):
                if self.pending_ack is not None and self.pending_ack[0] == event.checkpoint_id:
                    sender = SOURCE if self.kind == COUNT else COUNT
                    recorded = [(m.channel, FEEDBACK if m.channel in self.loop_inputs else sender,
                                 tuple(tuple(r) if isinstance(r, list) else r
                                       for r in m.batch.column("row").to_pylist()))
                                for m in event.messages if m.batch is not None]
                    if any(channel in self.loop_inputs for channel, _, _ in recorded):
                        self.world.stats["loop channel state recorded"] += 1
                    states = {**self.pending_ack[1], CHANNEL_STATE: {"state": recorded}}
                    self.pending_ack = None
                    self._acknowledge(event.checkpoint_id, states)
            elif isinstance(event, EndOfInput):
                if self.kind == COUNT and not self.loop_closed:
                    for output in range(len(self.outputs)):
                        self._send(output, eof=True)
                self.ended = True

    def _apply(self, rows: list[Any]) -> None:
        if self.kind == COUNT:
            out = []
            looping: list[list[int]] = [[] for _ in range(PARALLELISM)]
            for value in rows:
                key = value % BASE
                self.counts[key] = self.counts.get(key, 0) + 1
                out.append((key, self.counts[key]))
                again = next_round(value) if self.loop else None
                if again is not None:
                    looping[route(again)].append(again)
            self._send(0, tuple(out))
            for target, values in enumerate(looping):
                if values:
                    self._send(1 + target, tuple(values))
        else:
            if self.open_txn is None:
                self.txn_seq += 1
                self.open_txn = f"{self.name}:{self.run}:a{self.attempt}:t{self.txn_seq}"
            self.world.store.write(self.open_txn, [tuple(row) for row in rows])

    # -- checkpoints ----------------------------------------------------------------------

    def on_trigger_checkpoint(self, checkpoint_id: int) -> None:
        if checkpoint_id > self.last_barrier:
            self._snapshot(checkpoint_id)

    def _snapshot(self, checkpoint_id: int, *, acknowledge: bool = True,
                  unaligned: bool | None = None) -> dict[str, Any]:
        """The synchronous part (state, pre-commit, barrier downstream); the acknowledgement travels later."""
        self.last_barrier = checkpoint_id
        state: Any
        if self.kind == SOURCE:
            state = self.offset
        elif self.kind == COUNT:
            state = dict(self.counts)
        else:
            if self.open_txn is not None:
                self.world.store.prepare(self.open_txn)
                self.uncommitted[checkpoint_id] = [self.open_txn]
                self.open_txn = None
            state = {c_id: list(txns) for c_id, txns in self.uncommitted.items()}
        for output in range(len(self.outputs)):
            self._send_barrier(output, checkpoint_id,
                               unaligned=self.world.job.mode == "unaligned" if unaligned is None else unaligned)
        states = {self.kind: {"state": state}}
        if acknowledge:
            self._acknowledge(checkpoint_id, states)
        return states

    def _acknowledge(self, checkpoint_id: int, states: dict[str, Any]) -> None:
        self.acked.append(checkpoint_id)
        ack = TaskAck(self.task, states, attempt=self.attempt)
        self.world.send(self, self.coordinator, "acknowledge", checkpoint_id, ack)

    def on_notify(self, checkpoint_id: int) -> None:
        """A sink commits everything it pre-committed up to ``checkpoint_id``."""
        if self.kind != SINK:
            return
        ready = sorted(c_id for c_id in self.uncommitted if c_id <= checkpoint_id)
        for c_id in ready:
            for txn in self.uncommitted.pop(c_id):
                if self.attempt in self.world.fenced:
                    self.world.violation(f"{self}: commit of {txn} by fenced attempt {self.attempt}")
                self.world.store.commit(txn)

    # -- the loop ---------------------------------------------------------------------------

    def on_loop_status(self) -> LoopStatus:
        """``runtime/subtask.py``'s ``loop_status``, under the processing lock (a handler runs whole)."""
        assert self.gate is not None
        return LoopStatus(self.task, sent=sum(self.sent[1:]),
                          processed=sum(self.gate.applied(c) + 1 for c in self.loop_inputs),
                          idle=self.gate.idle,  # nothing buffered on the way out: the sim sends at once
                          inputs_ended=self.gate.ended(range(self.gate.forward)))

    def on_end_loop(self) -> None:
        """The loop is empty and its inputs ended: end the output; the end comes round as the head's end."""
        if self.loop_closed:
            return
        self.loop_closed = True
        for output in range(len(self.outputs)):
            self._send(output, eof=True)
        self._drain()

    def on_abort_checkpoint(self, checkpoint_id: int) -> None:
        if self.pending_ack is not None and self.pending_ack[0] == checkpoint_id:
            self.pending_ack = None
        if self.gate is not None and self.gate.abort_checkpoint(checkpoint_id):
            self._drain()


class Resolver(SimActor):
    """The task that resolves one sink operator's transactions (``runtime/job.py``'s ``_resolve_sink``)."""

    kind = "resolver"

    def on_commit(self, txns: list[str]) -> None:
        for txn in txns:
            self.world.store.commit(txn)

    def on_abort_lingering(self, keep: list[str]) -> None:
        self.world.store.abort_lingering(keep)


class Coordinator(SimActor):
    """The coordinator actor (``runtime/checkpointing.py``) around the real :class:`CheckpointCoordinator`."""

    kind = "coordinator"

    def __init__(self, world: World, run: str, baseline: int | None, tasks: list[str]) -> None:
        super().__init__(world, "coordinator", 0)
        self.run = run
        self.baseline = baseline
        newest = world.storage.completed_ids()
        self.core = CheckpointCoordinator(world.job.config, tasks, clock=world.now,
                                          next_id=newest[-1] + 1 if newest else 1)
        self.core.paused = True
        self.open = 0  # the attempt whose acknowledgements count (0: none)
        self.fenced = 0
        self.looping = False
        self.sources: list[Subtask] = []
        self.subtasks: list[Subtask] = []
        self.persisting: set[int] = set()
        self.fence_calls: list[Call] = []
        self.final_calls: list[Call] = []
        self.waiters: dict[int, Call] = {}
        self.notified: dict[Call, list[Call]] = {}
        self.fatal: dict[int, str] = {}

    def die(self) -> None:
        if self.alive:
            # Its manifest writes die with it: each landed (atomically) or did not.
            for write in [w for w in self.world.storage.in_flight if w.owner is self]:
                landed = self.world.chooser.choose(2) == 1
                if self.world.trace is not None:
                    self.world.log(f"  manifest {write.checkpoint_id} {'landed' if landed else 'lost'} at death")
                self.world.storage.settle(write, landed=landed)
        super().die()

    # -- calls from the driver --------------------------------------------------------------

    def on_start(self, attempt: int, sources: list[Subtask], subtasks: list[Subtask]) -> None:
        self.open = attempt
        self.sources = sources
        self.subtasks = subtasks
        self.core.resume()
        self.looping = True

    def on_fence(self) -> Any:
        self.fenced = max(self.fenced, self.open)
        self.open = 0
        self.sources = []
        self.subtasks = []
        self.execute(self.core.on_job_failure())
        if self.persisting and self.world.job.fence_waits_for_manifests:
            assert self.current is not None
            self.fence_calls.append(self.current)
            self.deferred.append(self.current)
            return DEFERRED
        return self.latest_checkpoint()

    def latest_checkpoint(self) -> int | None:
        latest = self.core.store.latest
        if latest is not None:
            return latest.checkpoint_id
        manifest = self.world.storage.latest(run=self.run)
        return manifest["checkpoint_id"] if manifest is not None else self.baseline

    def on_restore_point(self, checkpoint_id: int) -> dict[str, dict[str, Any]]:
        for completed in self.core.store.all():
            if completed.checkpoint_id == checkpoint_id:
                return {task: ack.states for task, ack in completed.acks.items()}
        manifest = self.world.storage.manifest(checkpoint_id)
        if manifest is None:
            msg = f"checkpoint {checkpoint_id} is not complete; it cannot be restored"
            raise LookupError(msg)
        return dict(manifest["tasks"])

    def on_final_checkpoint(self) -> Any:
        assert self.current is not None
        self.final_calls.append(self.current)
        self.deferred.append(self.current)
        self._retry_final()
        return DEFERRED

    def _retry_final(self) -> None:
        while self.final_calls:
            actions = self.core.trigger_now()
            if not actions:
                return
            call = self.final_calls.pop(0)
            trigger = actions[0]
            assert isinstance(trigger, TriggerCheckpoint)
            self.waiters[trigger.checkpoint_id] = call
            self.execute(actions)

    def tick(self) -> None:
        if self.looping:
            self.execute(self.core.poll())
        self._retry_final()
        self.settle_final()

    def settle_final(self) -> None:
        for call, notifies in list(self.notified.items()):
            if call.done:
                del self.notified[call]
            elif any(n.error for n in notifies):
                call.fail("a subtask died before it committed the final checkpoint")
            elif all(n.done for n in notifies):
                call.resolve(call.value)

    # -- calls from subtasks ----------------------------------------------------------------

    def on_acknowledge(self, checkpoint_id: int, ack: TaskAck) -> None:
        if ack.attempt != self.open or not self.open:
            self.world.ignored_acks += 1
            return
        if ack.attempt in self.world.fenced:
            self.world.violation(f"coordinator applied {ack.task}'s ack of {checkpoint_id} from fenced attempt "
                                 f"{ack.attempt}")
        _, actions = self.core.on_ack(checkpoint_id, ack)
        self.execute(actions)

    # -- manifest writes --------------------------------------------------------------------

    def on_write_settled(self, checkpoint_id: int, *, landed: bool) -> None:
        self.persisting.discard(checkpoint_id)
        if landed:
            self.execute(self.core.on_persisted(checkpoint_id))
        else:
            self.execute(self.core.on_persist_failed(checkpoint_id))
        if not self.persisting:
            for call in self.fence_calls:
                call.resolve(self.latest_checkpoint())
            self.fence_calls.clear()

    # -- actions ----------------------------------------------------------------------------

    def execute(self, actions: list[CheckpointAction]) -> None:
        world = self.world
        for action in actions:
            if world.trace is not None:
                world.log(f"  coordinator: {action!r:.90}")
            if isinstance(action, TriggerCheckpoint):
                for source in self.sources:
                    world.send(self, source, "trigger_checkpoint", action.checkpoint_id)
            elif isinstance(action, PersistCheckpoint):
                checkpoint = action.checkpoint
                manifest = {"checkpoint_id": checkpoint.checkpoint_id, "run": self.run,
                            "tasks": {task: ack.states for task, ack in checkpoint.acks.items()}}
                self.persisting.add(checkpoint.checkpoint_id)
                world.storage.begin(ManifestWrite(checkpoint.checkpoint_id, manifest, self))
            elif isinstance(action, NotifyCheckpointComplete):
                notifies = [world.send(self, t, "notify", action.checkpoint_id, call=True) for t in self.subtasks]
                waiter = self.waiters.pop(action.checkpoint_id, None)
                if waiter is not None:
                    waiter.value = action.checkpoint_id
                    self.notified[waiter] = notifies
                    self.settle_final()
            elif isinstance(action, AbortCheckpoint):
                for subtask in self.subtasks:
                    world.send(self, subtask, "abort_checkpoint", action.checkpoint_id)
                waiter = self.waiters.pop(action.checkpoint_id, None)
                if waiter is not None:
                    waiter.fail(f"checkpoint {action.checkpoint_id} was aborted ({action.reason.value})")
            elif isinstance(action, DiscardCheckpoint):
                world.storage.discard(action.checkpoint_id)
            elif isinstance(action, FailJob):
                self.fatal.setdefault(self.open, action.reason)


@dataclass(slots=True)
class Wait:
    """Something the driver watches, as a Ray reference in ``JobHandle._waits``."""

    kind: str  # "done", "watch", "final"
    actor: SimActor
    attempt: int = 0
    call: Call | None = None


Step = Generator[Callable[[], bool], None, SupervisorEvent | None]
"""A driver step that blocks: it yields conditions to wait for and returns the event it produced."""


class LoopWatch:
    """``runtime/job.py``'s ``_LoopWatch``: rounds of ``loop_status`` calls into the real :class:`LoopTermination`.

    A new round starts only after the previous one completed. While a source still reads, at most one
    starts per instant of the simulated clock (a tick is 100 ms or more; the loop cannot be found empty
    then anyway); once every source ended, rounds follow each other at once (the runtime's are 20 ms
    apart, a short time next to a message's way round the loop), so rounds overlap the loop's last
    messages in every order. A round in which a call failed counts for nothing and resets the detector.
    """

    def __init__(self, world: World, subtasks: list[Subtask], sources: list[Subtask]) -> None:
        self.world = world
        self.subtasks = subtasks
        self.sources = sources
        self.termination = LoopTermination()
        self.round: list[Call] = []
        self.started_at: float | None = None
        self.rounds = 0
        self.closed = False

    def due(self) -> bool:
        """Whether a poll would do something: finish the round in flight, or start the next one."""
        if self.closed:
            return False
        if self.round:
            return all(c.done for c in self.round)
        return (self.started_at is None or self.world.clock > self.started_at
                or all(s.ended for s in self.sources))

    def in_flight(self) -> bool:
        return bool(self.round) and not all(c.done for c in self.round)

    def poll(self) -> None:
        world = self.world
        if not self.round:
            self.started_at = world.clock
            self.round = [world.send(None, s, "loop_status", call=True) for s in self.subtasks]
            return
        calls, self.round = self.round, []
        self.rounds += 1
        if any(c.error is not None or c.value is None for c in calls):  # a failed (or broken) subtask
            world.log(f"driver: loop round {self.rounds} failed: {[c.error for c in calls]}")
            self.termination.reset()
            return
        statuses = [c.value for c in calls]
        ended = self.termination.observe(statuses)
        if world.trace is not None:
            world.log(f"driver: loop round {self.rounds}: "
                      f"{[(s.task, s.sent, s.processed, s.idle, s.inputs_ended) for s in statuses]} -> {ended}")
        if ended:
            self.closed = True
            world.stats["loops ended"] += 1
            for subtask in self.subtasks:  # every counting subtask is a loop head
                world.send(None, subtask, "end_loop")


class Driver:
    """The job driver (``runtime/job.py``'s ``JobHandle``): feeds the real supervisor, carries out its actions.

    Args:
        world: the world it runs in.
        run: this run's id.
        resume: start from the newest completed checkpoint in storage (of any run).
    """

    def __init__(self, world: World, run: str, *, resume: bool) -> None:
        self.world = world
        self.run = run
        self.supervisor = JobSupervisor(world.job.restart, checkpointing=True)
        self.coordinator: Coordinator | None = None
        self.number = 0
        self.actors: list[Subtask] = []
        self.waits: list[Wait] = []
        self.timer: tuple[float, int] | None = None
        self.events: collections.deque[SupervisorEvent] = collections.deque()
        self.requests: collections.deque[SupervisorEvent] = collections.deque()
        self.actions: collections.deque[SupervisorAction] = collections.deque()
        self.task: Step | None = None
        self.loop: LoopWatch | None = None
        self.condition: Callable[[], bool] = lambda: True
        self.finish: Finish | None = None
        self.done = False
        self.errors: list[str] = []
        self.findings: list[str] = []
        self.restored_from: list[int] = []
        self.end_resolved = False
        latest = world.storage.latest() if resume else None
        self.restore: int | None = latest["checkpoint_id"] if latest is not None else None
        self.actions.extend(self.supervisor.start(self.restore))

    @property
    def tasks(self) -> list[str]:
        return [f"{op}/{i}" for op, n in ((SOURCE, len(self.world.job.events)), (COUNT, PARALLELISM),
                                          (SINK, PARALLELISM)) for i in range(n)]

    # -- the loop -------------------------------------------------------------------------

    def ready(self) -> bool:
        """Whether a driver step can make progress now."""
        if self.done:
            return False
        if self.task is not None:
            return self.condition()
        if self.actions or self.events or self.requests:
            return True
        if self.timer is not None and self.world.clock >= self.timer[0]:
            return True
        if self._loop_due():
            return True
        for wait in self.waits:
            actor = wait.actor
            if not actor.alive or actor.broken:
                return True
            kind = wait.kind
            if kind == "done":
                if actor.ended:  # type: ignore[attr-defined]
                    return True
            elif (kind == "final" or actor is self.coordinator) and self._wait_state(wait)[0]:
                return True
        return False

    def step(self) -> None:
        """Take one step, and then the steps that need nothing outside the driver (as its thread would)."""
        self._step()
        while not self.done and self.task is None and (self.actions or self.events):
            self._step()

    def _step(self) -> None:
        if self.task is not None:
            self._advance()
        elif self.actions:
            action = self.actions.popleft()
            if self.world.trace is not None:
                self.world.log(f"driver: {action!r}")
            outcome = self._execute(action)
            if isinstance(outcome, Generator):
                self.task = outcome
                self._advance()
            elif outcome is not None:
                self.events.append(outcome)
        else:
            event = self._next_event()
            if event is not None:
                if self.world.trace is not None:
                    self.world.log(f"supervisor <- {event!r} ({self.supervisor.phase.name})")
                self.actions.extend(self.supervisor.on_event(event))

    def _advance(self) -> None:
        assert self.task is not None
        try:
            self.condition = self.task.send(None)
        except StopIteration as stop:
            self.task = None
            if stop.value is not None:
                self.events.append(stop.value)

    def _next_event(self) -> SupervisorEvent | None:
        if self.events:
            return self.events.popleft()
        if self.requests:
            return self.requests.popleft()
        if self.timer is not None and self.world.clock >= self.timer[0]:
            attempt = self.timer[1]
            self.timer = None
            return RestartDue(attempt)
        if self._loop_due():  # and then, in the same step, look at the waits (as the runtime's loop does)
            assert self.loop is not None
            self.loop.poll()
        for wait in list(self.waits):
            ready, value, error = self._wait_state(wait)
            if not ready:
                continue
            if error is not None:
                return Failed(self.number, f"{wait.actor.name}: {error}", retryable=not wait.actor.broken)
            self.waits.remove(wait)
            if wait.kind == "final":
                return FinalCheckpointCompleted(self.number, value)
            if wait.kind == "done" and not any(w.kind == "done" for w in self.waits):
                return InputEnded(self.number)
            return None
        return None

    def _loop_due(self) -> bool:
        """The loop watch polls while the job runs (``JobHandle._next_event``)."""
        return (self.loop is not None and bool(self.waits) and self.supervisor.phase.name == "RUNNING"
                and self.loop.due())

    def _wait_state(self, wait: Wait) -> tuple[bool, Any, str | None]:
        actor = wait.actor
        if not actor.alive:
            return True, None, "actor died"
        if actor.broken:
            return True, None, "bad data (not retryable)"
        if wait.kind == "done":
            return (True, None, None) if isinstance(actor, Subtask) and actor.ended else (False, None, None)
        if wait.kind == "watch":
            if isinstance(actor, Coordinator):
                if wait.attempt in actor.fatal:
                    return True, None, actor.fatal[wait.attempt]
                if wait.attempt <= actor.fenced:
                    return True, None, None
            return False, None, None
        assert wait.call is not None
        if isinstance(actor, Coordinator):
            actor.settle_final()
        return wait.call.done, wait.call.value, wait.call.error

    # -- actions ----------------------------------------------------------------------------

    def _execute(self, action: SupervisorAction) -> Step | SupervisorEvent | None:
        if isinstance(action, ResolveSinks):
            return self._resolve_sinks(action)
        if isinstance(action, DeployAttempt):
            return self._deploy(action.attempt, action.restore)
        if isinstance(action, StopSources):
            for source in self.actors:
                if source.kind == SOURCE:
                    self.world.send(None, source, "stop")
            return None
        if isinstance(action, TakeFinalCheckpoint):
            assert self.coordinator is not None
            call = self.world.send(None, self.coordinator, "final_checkpoint", call=True)
            self.waits.append(Wait("final", self.coordinator, call=call))
            return None
        if isinstance(action, FenceAttempt):
            return self._fence(action.attempt)
        if isinstance(action, ScheduleRestart):
            self.timer = (self.world.clock + action.delay_s, action.attempt)
            return None
        if isinstance(action, Finish):
            return self._finish(action)
        msg = f"the simulation does not model {action!r}"
        raise AssertionError(msg)

    def _resolve_sinks(self, action: ResolveSinks) -> Step:
        attempt = self.supervisor.attempt
        committables: list[str] = []
        if action.checkpoint_id is not None:
            manifest = self.world.storage.manifest(action.checkpoint_id)
            if manifest is None:
                return Failed(attempt, f"checkpoint {action.checkpoint_id} is not complete")
            for task, states in sorted(manifest["tasks"].items()):
                if task.startswith(f"{SINK}/"):
                    recorded = states[SINK]["state"]
                    committables += [t for c_id, txns in sorted(recorded.items()) if c_id <= action.checkpoint_id
                                     for t in txns]
        commit = [] if action.end is SinkEnd.FAIL else committables
        resolver = Resolver(self.world, "resolver", attempt)
        calls = [self.world.send(None, resolver, "commit", commit, call=True),
                 self.world.send(None, resolver, "abort_lingering", committables, call=True)]
        yield lambda: all(c.done for c in calls)
        resolver.alive = False  # the task returned (or its worker died)
        errors = [c.error for c in calls if c.error]
        if errors:
            return Failed(attempt, f"resolving the sinks' transactions failed: {errors[0]}")
        if action.end is not SinkEnd.RESTORE:
            self.end_resolved = True
        return SinksResolved(attempt)

    def _deploy(self, number: int, restore_id: int | None) -> Step:
        world = self.world
        self.number = number
        self.actors = []
        self.waits = []
        if self.coordinator is None:
            self.coordinator = Coordinator(world, self.run, restore_id, self.tasks)
        coordinator = self.coordinator
        states: dict[str, dict[str, Any]] = {}
        if restore_id is not None:
            call = world.send(None, coordinator, "restore_point", restore_id, call=True)
            yield lambda: call.done
            if call.error:
                return Failed(number, f"deploying attempt {number} failed: {call.error}")
            states = call.value
            self.restored_from.append(restore_id)
        for task in self.tasks:
            operator, index = task.split("/")
            restore = {op: s["state"] for op, s in states.get(task, {}).items()} if states else None
            self.actors.append(Subtask(world, operator, int(index), number, self.run, coordinator, restore))
            yield lambda: True  # creating the next actor is a step of its own
        by_kind = {kind: [a for a in self.actors if a.kind == kind] for kind in (SOURCE, COUNT, SINK)}
        downstream = {SOURCE: by_kind[COUNT], COUNT: by_kind[SINK], SINK: []}
        looping = world.job.loop
        calls = []
        for actor in self.actors:
            targets = downstream[actor.kind] if actor.kind != COUNT else [by_kind[SINK][actor.index]]
            if actor.kind == COUNT and looping:
                targets = [*targets, *by_kind[COUNT]]  # the feedback edge, routed by key
            calls.append(world.send(None, actor, "connect", targets, call=True))
        yield lambda: all(c.done for c in calls)
        errors = [c.error for c in calls if c.error]
        if errors:
            return Failed(number, f"deploying attempt {number} failed: {errors[0]}")
        start = world.send(None, coordinator, "start", number, by_kind[SOURCE], list(self.actors), call=True)
        yield lambda: start.done
        if start.error:
            return Failed(number, f"deploying attempt {number} failed: {start.error}")
        self.waits.append(Wait("watch", coordinator, attempt=number))
        for actor in self.actors:
            self.waits += [Wait("done", actor), Wait("watch", actor)]
        self.loop = LoopWatch(world, by_kind[COUNT], by_kind[SOURCE]) if looping else None
        for source in by_kind[SOURCE]:
            world.send(None, source, "run")
        return Deployed(number)

    def _fence(self, number: int) -> Step:
        world = self.world
        actors = self.actors
        for actor in actors:
            world.kill(actor)
        self.waits = []
        self.loop = None
        latest: int | None = None
        if self.coordinator is not None:
            call = world.send(None, self.coordinator, "fence", call=True)
            yield lambda: call.done
            if call.error:
                coordinator = self.coordinator
                self.coordinator = None
                world.kill(coordinator)
                yield lambda: not coordinator.alive
            else:
                latest = call.value
        if self.coordinator is None:
            manifest = world.storage.latest(run=self.run)
            latest = manifest["checkpoint_id"] if manifest is not None else self.supervisor.latest_checkpoint
        yield lambda: not any(a.alive for a in actors)
        world.fenced.add(number)
        self.actors = []
        return Fenced(number, latest)

    def _finish(self, finish: Finish) -> Step:
        self.finish = finish
        yield lambda: True  # the driver thread may be preempted here
        # JobHandle._final_result takes the counters it gathered when the input ended and leaves out an
        # actor that died since: a finished job's result never depends on its actors staying alive.
        actors: list[SimActor] = list(self.actors)
        if self.coordinator is not None:
            actors.append(self.coordinator)
            self.coordinator = None
        for actor in actors:
            self.world.kill(actor)
        self.waits = []
        self.loop = None
        yield lambda: not any(a.alive for a in actors)
        self.done = True
        return None

    # -- user requests --------------------------------------------------------------------

    def stop(self) -> None:
        self.requests.append(StopRequested())

    def cancel(self) -> None:
        self.requests.append(CancelRequested())


class World:
    """Everything of one schedule: the job, its external systems, the actors, the message queues, the clock.

    Args:
        job: what runs.
        chooser: where every choice comes from.
        trace: record a readable line per step.
    """

    def __init__(self, job: Job, chooser: Chooser, *, trace: bool = False) -> None:
        self.job = job
        self.chooser = chooser
        self.trace: list[str] | None = [] if trace else None
        self.clock = 0.0
        self.store = TransactionalStore()
        self.storage = ManifestStorage()
        self.actors: list[SimActor] = []
        self.queues: dict[tuple[int, int], collections.deque[Message]] = {}
        self.fenced: set[int] = set()
        self.doomed: list[SimActor] = []
        self.violations: list[str] = []
        self.ignored_acks = 0
        self.stats: collections.Counter[str] = collections.Counter()
        self.runs = 0
        self.driver = self.new_run(resume=False)

    def now(self) -> float:
        return self.clock

    def new_run(self, *, resume: bool) -> Driver:
        """Start a run of the job (a second one resumes after the first ended)."""
        self.runs += 1
        self.fenced = set()
        self.driver = Driver(self, f"r{self.runs}", resume=resume)
        return self.driver

    def log(self, line: str) -> None:
        if self.trace is not None:
            self.trace.append(line)

    def violation(self, line: str) -> None:
        self.violations.append(line)
        self.log(f"VIOLATION: {line}")

    # -- messages -------------------------------------------------------------------------

    def send(self, sender: SimActor | None, target: SimActor, method: str, *args: Any, call: bool = False) -> Any:
        """Send a call; with ``call``, return its :class:`Call` (it fails if the target is or becomes dead)."""
        outcome = Call() if call else None
        if not target.alive:
            if outcome is not None:
                outcome.fail(f"{target.name} is dead")
            return outcome
        key = (id(sender), id(target))
        queue = self.queues.get(key)
        if queue is None:
            queue = self.queues[key] = collections.deque()
        queue.append(Message(target, method, args, outcome))
        return outcome

    def deliver(self, key: tuple[int, int]) -> None:
        """Run the oldest message of queue ``key`` on its target."""
        queue = self.queues[key]
        message = queue.popleft()
        if not queue:
            del self.queues[key]
        target = message.target
        if self.trace is not None:
            self.log(f"deliver {target}.{message.method}{_short(message.args)}")
        if not target.alive:
            if message.call is not None:
                message.call.fail(f"{target.name} died")
            return
        if target.broken:
            if message.call is not None:
                message.call.resolve(None)
            return
        target.current = message.call
        try:
            value = getattr(target, f"on_{message.method}")(*message.args)
        except LookupError as error:
            if message.call is not None:
                message.call.fail(str(error))
            return
        finally:
            target.current = None
        if message.call is not None and value is not DEFERRED:
            message.call.resolve(value)

    def on_death(self, actor: SimActor) -> None:
        """Calls queued to a dead actor fail at once (as Ray's do)."""
        if actor.doomed:
            self.doomed.remove(actor)
        for key in [k for k, q in self.queues.items() if q[0].target is actor]:
            for message in self.queues.pop(key):
                if message.call is not None:
                    message.call.fail(f"{actor.name} died")

    def kill(self, actor: SimActor) -> None:
        """``ray.kill``: the actor dies when the kill lands (a later step)."""
        if actor.alive and not actor.doomed:
            actor.doomed = True
            self.doomed.append(actor)

    def settle_write(self, write: ManifestWrite, *, landed: bool) -> None:
        if self.trace is not None:
            self.log(f"manifest {write.checkpoint_id} {'written' if landed else 'failed'}")
        self.storage.settle(write, landed=landed)
        write.owner.on_write_settled(write.checkpoint_id, landed=landed)

    # -- observation ----------------------------------------------------------------------

    def live_actors(self) -> list[SimActor]:
        return [a for a in self.actors if a.alive]

    def coordinators(self) -> list[Coordinator]:
        return [a for a in self.actors if isinstance(a, Coordinator) and a.alive]


def _short(args: tuple[Any, ...]) -> str:
    text = ", ".join(repr(a) if not isinstance(a, list) else f"[{len(a)}]" for a in args)
    return f"({text[:100]})"
