"""Subtasks: one per subtask of a vertex, created by the job as named async Ray actors.

A subtask is a thin adapter over sans-IO parts that decide everything:

- :class:`~onceflow.runtime.chain.OperatorChain`: the fused operators, the
  routing between them, their snapshots and counters;
- :class:`~onceflow.runtime.input_gate.InputGate` (an :class:`OperatorSubtask`'s
  input): channel order and repeats, barrier alignment, input watermarks, end of input;
- :class:`~onceflow.runtime.sink_committer.SinkCommitter` (when the chain ends
  in a sink): writes, pre-commits on barriers, commits in checkpoint order;
- :class:`~onceflow.runtime.output.OutputGate`: credit-based channels to the
  subtasks downstream.

A :class:`SourceSubtask` runs its reader's loop (``run``) and injects barriers
when the coordinator triggers a checkpoint; an :class:`OperatorSubtask` is driven
by the messages its upstream subtasks ``push``. A ``push`` returns (and so gives
its sender the credit back) only once its message was processed: a channel held
back by barrier alignment holds its sender back, as in Flink. Two exceptions:
a push on a loop's feedback channel returns on arrival (waiting would close a
cycle of credit waits), and nothing is processed before ``connect`` wired the
output gates (a restored subtask wired earlier may already replay its channel
state towards this one). A loop head ends its output when the job's driver
finds the loop empty (``loop_status``, ``end_loop``; :mod:`~onceflow.runtime.loops`).

Snapshots have a synchronous part (under the processing lock: every operator
returns an immutable Arrow table, the sink pre-commits, the barrier goes
downstream) and an asynchronous part (``ray.put`` owned by the coordinator, the
Arrow IPC file in durable storage, the acknowledgement) that runs while
processing goes on.

Locks (asyncio, all on the actor's event loop):

- ``_lock``: the processing lock. It guards operator state (the chain, the
  input gate, the source reader and its watermark generator) and the output
  gates, so operator logic never sees two events at once and the output
  channels see batches, watermarks and barriers in one order.
- ``_commit_lock``: serialises the sink's commits, which run without the
  processing lock (a sink write may wait on a row lock that only a commit
  releases).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import ray

from onceflow.checkpoint.coordinator import TaskAck
from onceflow.checkpoint.state import source_state
from onceflow.checkpoint.storage import CheckpointStorage, StateHandle
from onceflow.checkpoint.two_phase_commit import SinkContext
from onceflow.errors import OnceflowError
from onceflow.operators.keygroups import key_group_range
from onceflow.operators.logic import Emitted, OperatorContext, OperatorLogic, StatePieces
from onceflow.operators.sources.base import Idle, PerSplitWatermarks, SideOutputs, SourceContext, SourceReader
from onceflow.runtime.chain import INTO_SINK, OperatorChain, Output, operator_failure
from onceflow.runtime.channel import (
    CHANNEL_STATE,
    END_OF_TIME,
    INPUT_WATERMARKS,
    NO_WATERMARK,
    ChannelMessage,
    channel_state_table,
    input_channel_names,
)
from onceflow.runtime.dataflow import NodeKind
from onceflow.runtime.deployment import (
    AttemptId,
    CheckpointSetup,
    RuntimeOptions,
    SubtaskRestore,
    load_restored,
    replayed_channel_state,
    restored_position,
)
from onceflow.runtime.input_gate import (
    BarrierAligned,
    ChannelStateRecorded,
    EndOfInput,
    InputGate,
    PieceSize,
    Rows,
    UnalignedSnapshot,
    WatermarkAdvanced,
)
from onceflow.runtime.logs import configure_logging
from onceflow.runtime.loops import LoopStatus
from onceflow.runtime.metrics import SubtaskCounters
from onceflow.runtime.output import DownstreamFailedError, OutputGate
from onceflow.runtime.sink_committer import SinkCommitter
from onceflow.runtime.telemetry import SubtaskMetrics
from onceflow.testing.failpoints import crash_point

if TYPE_CHECKING:
    from collections.abc import Coroutine, Iterator

    from ray.actor import ActorHandle

    from onceflow.operators.watermark import SplitWatermarkGenerator, WatermarkGenerator
    from onceflow.runtime.plan import PhysicalPlan, VertexSpec

__all__ = ["AttemptFencedError", "OperatorSubtask", "SourceSubtask", "Subtask", "subtask_class", "write_pieces"]

log = logging.getLogger("onceflow")

_PIECE_S = 0.01
"""With checkpoints that may be unaligned, input is processed in pieces that take about this long (their size
follows the measured rate, :class:`~onceflow.runtime.input_gate.PieceSize`): a snapshot waits for one piece."""

_ABORT_WAIT_S = 5.0
"""How long an abort waits for a sink write in progress (the job waits 10 s for every abort)."""

_PUBLISH_S = 1.0
"""How often a subtask hands its counters and watermark to the metrics exporter."""


class AttemptFencedError(Exception):
    """The subtask's attempt was fenced: the job restarts, and this actor is reset for the next attempt."""


class Subtask:
    """What every subtask does: the chain, the sink, the output gates, snapshots, failure and counters.

    Args:
        plan: the job's physical plan.
        vertex_id: the vertex this subtask runs.
        subtask: its index among the vertex's subtasks.
        options: data-plane settings.
        checkpointing: the coordinator and storage, or ``None`` without checkpoints.
        restore: the state to start from, or ``None`` for a fresh start.
        attempt: the run and attempt this subtask belongs to.

    """

    def __init__(self, plan: PhysicalPlan, vertex_id: int, subtask: int, options: RuntimeOptions,
                 checkpointing: CheckpointSetup | None = None, restore: SubtaskRestore | None = None,
                 attempt: AttemptId | None = None) -> None:
        configure_logging(options.log_level)
        vertex = plan.vertices[vertex_id]
        self._plan = plan
        self._vertex: VertexSpec = vertex
        self._subtask = subtask
        self._options = options
        self._checkpointing = checkpointing
        self._attempt = attempt or AttemptId()
        self.task = f"{vertex.name}/{subtask}"
        self._label = f"{plan.job}/{self.task}"
        self._node = _node_id()
        self._written_pieces: dict[int, dict[int, tuple[object, StateHandle]]] = {}
        """Per checkpoint this subtask acknowledged (incremental): the pieces it named, by their identity."""
        self._storage = CheckpointStorage(checkpointing.storage, plan.job) if checkpointing else None
        self._restored_from = restore.checkpoint_id if restore else None
        self._restored_tables: collections.Counter[str] = collections.Counter()
        restored = load_restored(restore, self._storage, self._restored_tables)
        self._uids = [node.uid for node in vertex.nodes]
        self._sink_stage: int | None = None
        self._sink: SinkCommitter | None = None
        logics: dict[int, OperatorLogic] = {}
        for stage, node in enumerate(vertex.nodes):
            if node.kind is NodeKind.SINK:
                # The restored checkpoint's transactions were resolved by the job before this attempt deployed.
                self._sink_stage = stage
                self._sink = SinkCommitter(node.spec, self._sink_context())
            elif node.kind is not NodeKind.SOURCE:
                op_ctx = OperatorContext(node.name, subtask, vertex.parallelism, plan.max_parallelism,
                                         key_group_range(subtask, vertex.parallelism, plan.max_parallelism))
                tables = restored.get(node.uid)
                # Several tables (rescaling) go over as a sequence, each with its own metadata;
                # the operator keeps the rows of its own key groups.
                resume = (tables[0] if len(tables) == 1 else tables) if tables else None
                logics[stage] = node.spec.build(op_ctx, resume_state=resume) if resume is not None \
                    else node.spec.build(op_ctx)
        self._chain = OperatorChain([node.name for node in vertex.nodes], logics,
                                    wired={(spec.stage, spec.port) for spec in vertex.outputs},
                                    sink=self._sink_stage, subtask=subtask)
        self._lock = asyncio.Lock()
        """The processing lock: operator state (chain, input gate, reader) and the output gates (module docstring)."""
        self._commit_lock = asyncio.Lock()
        """Serialises the sink's commits, which run without the processing lock."""
        self._restore_input(restored)
        self._gates: dict[tuple[int, int], list[OutputGate]] = {}
        self._all_gates: list[OutputGate] = []
        self._connected = asyncio.Event()
        """Set once the output gates exist: input is processed only then (its output would have nowhere to go)."""
        self._finished = asyncio.Event()
        self._failed = asyncio.Event()
        self._failure: BaseException | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._persisting: set[asyncio.Task[None]] = set()
        """The snapshots being written (a subset of ``_background``): a fence waits for them."""
        self._ended = False
        self._started_at: float | None = None
        self._finished_at: float | None = None
        self._first_record_at: float | None = None
        self._telemetry = SubtaskMetrics(plan.job, vertex.operators, subtask)

    def _restore_input(self, restored: dict[str, list[pa.Table]]) -> None:
        """Build the subtask's input side (a reader, an input gate) from the restored state."""
        raise NotImplementedError

    def _input_state(self) -> dict[str, pa.Table]:
        """The input side's snapshot tables (a reader's position, the input channels' watermarks)."""
        raise NotImplementedError

    def _max_event_time(self) -> int | None:
        """A source's newest event time read (``None`` elsewhere)."""
        return None

    async def _tick(self) -> None:
        """Under the lock, from the linger timer (an operator subtask's alignment may time out)."""

    def _sink_context(self) -> SinkContext:
        return SinkContext(self._plan.job, self._vertex.nodes[-1].name, self._subtask, self._vertex.parallelism,
                           run=self._attempt.run, attempt=self._attempt.number)

    # -- wiring ---------------------------------------------------------------------

    async def connect(self, downstream: dict[int, list[ActorHandle]]) -> str:
        """Receive the handles of downstream subtasks; start the linger timer."""
        for spec in self._vertex.outputs:
            gate = OutputGate(
                spec, self._subtask, downstream[spec.target], operator=self._vertex.nodes[spec.stage].name,
                max_parallelism=self._plan.max_parallelism, credits=self._options.credits,
                batch_bytes=self._options.batch_bytes, attempt=self._attempt.number,
            )
            self._gates.setdefault((spec.stage, spec.port), []).append(gate)
            self._all_gates.append(gate)
        self._connected.set()
        self._spawn(self._linger_loop())
        self._spawn(self._publish_loop())
        return self._label

    def _spawn(self, coroutine: Coroutine[Any, Any, None], *, persist: bool = False) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        if persist:
            self._persisting.add(task)
            task.add_done_callback(self._persisting.discard)

    def mark_fenced(self) -> None:
        """Fail with :class:`AttemptFencedError` (quietly), before the calls in progress are cancelled."""
        if self._failure is None:
            self._failure = AttemptFencedError(f"{self._label}: attempt {self._attempt.number} was fenced")
        for event in (self._finished, self._failed, self._connected):
            event.set()

    async def fence(self, wait_s: float) -> bool:
        """Retire this subtask: its attempt was fenced, and its actor is reset in place for the next one.

        Everything waiting on it wakes to a failure (:class:`AttemptFencedError`),
        its timers stop, the snapshots being written land (their acknowledgements
        are ignored: the coordinator fenced the attempt), a commit in progress
        ends, the sink's writer is aborted (what it pre-committed stays for
        recovery) and the source's reader is closed. The caller cancels the
        calls in progress first (:class:`SubtaskActor`).

        Returns:
            whether all of it happened within ``wait_s``. ``False`` (a write or
            a commit still runs in its thread) means that the actor must be
            killed instead: recovery resolves the sinks' transactions only with
            no writer of the job left.
        """
        self.mark_fenced()
        deadline = time.monotonic() + wait_s
        for task in self._background - self._persisting:
            task.cancel()
        if self._persisting:
            _, pending = await asyncio.wait(self._persisting, timeout=wait_s)
            if pending:
                log.warning("%s: a snapshot was still being written %.1f s after the fence", self._label, wait_s)
                return False
        try:
            await asyncio.wait_for(self._commit_lock.acquire(), max(deadline - time.monotonic(), 0.0))
        except TimeoutError:
            log.warning("%s: a commit still ran %.1f s after the fence", self._label, wait_s)
            return False
        clean = True
        if self._sink is not None:
            clean = await asyncio.to_thread(self._sink.abort, max(deadline - time.monotonic(), 0.0),
                                            discard_final=self._checkpointing is None)
            if clean:
                try:
                    self._sink.writer.close()
                except Exception as error:  # noqa: BLE001 - the attempt is over; at most a leak
                    log.warning("%s: closing the sink's writer after the fence failed: %s", self._label, error)
        self._close_input()
        return clean

    def _close_input(self) -> None:
        """Release the input side's resources (a source's reader) when the subtask is fenced."""

    async def _publish_loop(self) -> None:
        """Every second, hand the counters and the watermark to the metrics exporter (a sink's subtask too)."""
        while self._failure is None:
            await asyncio.sleep(_PUBLISH_S)
            self._telemetry.publish(self._chain.records_in, self._chain.records_out,
                                    sum(g.backpressure_s for g in self._all_gates), self._current_watermark())

    async def _linger_loop(self) -> None:
        if not self._all_gates:
            return
        period = max(self._options.linger_s / 2, 0.001)
        while self._failure is None:
            await asyncio.sleep(period)
            async with self._lock:
                try:
                    await self._tick()
                    for gate in self._all_gates:
                        await gate.flush_lingering(self._options.linger_s)
                except BaseException as error:  # noqa: BLE001 - recorded, reported by done()
                    self._fail(error)
                    return

    # -- processing -----------------------------------------------------------------

    def _fail(self, error: BaseException, operator: str | None = None) -> None:
        """Record this subtask's first failure (blamed on ``operator``, by default the vertex) and report it."""
        if self._failure is not None:
            return
        if isinstance(error, OnceflowError | DownstreamFailedError):
            self._failure = error
        else:
            self._failure = operator_failure(error, operator or self._vertex.name, self._subtask)
        if not isinstance(error, DownstreamFailedError | ray.exceptions.RayActorError):
            log.error("%s failed: %s", self._label, self._failure)
        self._finished.set()
        self._failed.set()

    @contextlib.contextmanager
    def _blame(self, stage: int) -> Iterator[None]:
        """Raise an exception raised inside as a failure of node ``stage``."""
        try:
            yield
        except Exception as error:
            failure = operator_failure(error, self._vertex.nodes[stage].name, self._subtask)
            if failure is error:
                raise
            raise failure from error

    async def _send(self, outputs: list[Output]) -> None:
        """Hand the chain's outputs on: to the sink, or to the output gates of their port."""
        for output in outputs:
            if output.port == INTO_SINK:
                await self._write_sink(output.stage, output.batch)
            else:
                for gate in self._gates.get((output.stage, output.port), ()):
                    await gate.send(output.batch)

    async def _write_sink(self, stage: int, batch: pa.RecordBatch) -> None:
        assert self._sink is not None  # the chain routes INTO_SINK only when there is a sink
        with self._blame(stage):
            # A sink may block on its external system (a row lock held by a
            # prepared transaction that only our own commit releases): keep
            # the event loop free so that notify_checkpoint_complete can run.
            await asyncio.to_thread(self._sink.write, batch)
        crash_point(self._plan.job, "sink.after_write", self._subtask)

    async def _advance_watermark(self, watermark: int) -> None:
        await self._send(self._chain.on_watermark(watermark))
        for gate in self._all_gates:
            gate.set_watermark(watermark)

    async def _end_of_input(self) -> None:
        await self._end_output()
        self._mark_ended()

    async def _end_output(self) -> None:
        """Flush the operators, end every output channel, and (without checkpoints) pre-commit the sink."""
        await self._send(self._chain.on_eof())
        for gate in self._all_gates:
            gate.set_watermark(END_OF_TIME)
            await gate.close()
        if self._sink is not None and self._sink_stage is not None and self._checkpointing is None:
            # Without checkpoints the job commits once, after every subtask ended.
            with self._blame(self._sink_stage):
                self._sink.end_of_input()

    def _mark_ended(self) -> None:
        self._ended = True
        self._finished_at = time.monotonic()
        self._finished.set()

    def node(self) -> str:
        """The id of the Ray node this subtask runs on (``""`` outside Ray)."""
        return self._node

    async def done(self) -> None:
        """Return when this subtask processed its end of input; raise its failure if it failed."""
        await self._finished.wait()
        if self._failure is not None:
            raise self._failure

    async def watch(self) -> None:
        """Return only if this subtask fails (raising its failure); for the job's supervision."""
        await self._failed.wait()
        assert self._failure is not None  # set before _failed
        raise self._failure

    # -- checkpoints ----------------------------------------------------------------

    async def _checkpoint(self, checkpoint_id: int, triggered_at: float, alignment_s: float, *,
                          unaligned: bool = False) -> None:
        """Take a snapshot (:meth:`_snapshot`) and persist it in the background."""
        tables, metrics = await self._snapshot(checkpoint_id, triggered_at, alignment_s, unaligned=unaligned)
        self._spawn(self._persist(checkpoint_id, tables, metrics), persist=True)

    async def _snapshot(self, checkpoint_id: int, triggered_at: float, alignment_s: float, *,
                        unaligned: bool = False) -> tuple[dict[str, pa.Table | StatePieces], dict[str, float]]:
        """The synchronous part, under the lock: state tables, pre-commit, barrier downstream.

        An unaligned snapshot sends its barriers ahead of the messages
        downstream has not processed. Returns the state tables and the
        snapshot's timings, for :meth:`_persist`.
        """
        started = time.monotonic()
        tables: dict[str, pa.Table | StatePieces] = dict(self._input_state())
        incremental = self._checkpointing is not None and self._checkpointing.incremental
        tables.update(self._chain.snapshot(self._uids, pieces=incremental))
        if self._sink is not None and self._sink_stage is not None:
            with self._blame(self._sink_stage):
                tables[self._uids[self._sink_stage]] = self._sink.pre_commit(checkpoint_id)
            crash_point(self._plan.job, "sink.after_pre_commit", self._subtask)
        for gate in self._all_gates:
            await gate.barrier(checkpoint_id, triggered_at, unaligned=unaligned)
        metrics = {
            "sync_s": time.monotonic() - started,
            "alignment_s": alignment_s,
            "start_delay_s": max(time.time() - triggered_at - alignment_s, 0.0),
            "unaligned": float(unaligned),
        }
        return tables, metrics

    async def _persist(self, checkpoint_id: int, tables: dict[str, pa.Table | StatePieces],
                       metrics: dict[str, float]) -> None:
        """The asynchronous part: cache in the object store, write durably, acknowledge."""
        assert self._checkpointing is not None and self._storage is not None  # barriers come only with checkpoints
        coordinator = self._checkpointing.coordinator
        started = time.monotonic()
        try:
            states: dict[str, dict[str, Any]] = {}
            cache: dict[str, Any] = {}
            reusable = await self._reusable_pieces(checkpoint_id, tables)
            written: dict[int, tuple[object, StateHandle]] = {}
            written_bytes = 0
            for operator, table in tables.items():
                if isinstance(table, StatePieces):
                    states[operator], new_bytes = await asyncio.to_thread(
                        write_pieces, self._storage, checkpoint_id, self.task, operator, table, reusable, written)
                    written_bytes += new_bytes
                    cached: Any = [table.head, *(piece for _, piece in table.pieces)]
                else:
                    handle = await asyncio.to_thread(self._storage.write_state, checkpoint_id, self.task, operator,
                                                     table)
                    states[operator] = handle.to_manifest()
                    written_bytes += handle.bytes
                    cached = table
                if self._checkpointing.cache:
                    with contextlib.suppress(Exception):  # the cache is optional; the file is not
                        cache[operator] = await asyncio.to_thread(ray.put, cached, _owner=coordinator)
            if self._checkpointing.incremental:
                self._written_pieces[checkpoint_id] = written
            metrics = {**metrics, "async_s": time.monotonic() - started,
                       "state_bytes": float(sum(s["bytes"] for s in states.values())),
                       "written_bytes": float(written_bytes)}
            log.debug("%s: checkpoint %d snapshot: sync %.3f s, async %.3f s, alignment %.3f s, %d bytes",
                      self._label, checkpoint_id, metrics["sync_s"], metrics["async_s"], metrics["alignment_s"],
                      int(metrics["state_bytes"]))
            coordinator.acknowledge.remote(checkpoint_id, TaskAck(self.task, states, cache, metrics,
                                                                  attempt=self._attempt.number))
        except Exception as error:  # noqa: BLE001 - a failed snapshot declines the checkpoint
            log.warning("%s: checkpoint %d failed: %s", self._label, checkpoint_id, error)
            coordinator.decline.remote(checkpoint_id, self.task, str(error))

    async def _reusable_pieces(self, checkpoint_id: int,
                               tables: dict[str, pa.Table | StatePieces]) -> dict[int, tuple[object, StateHandle]]:
        """The pieces this checkpoint need not write: those the newest completed checkpoint holds.

        The coordinator says which checkpoint was the newest completed when it
        triggered this one: that checkpoint (and so every file it names) stays
        until this one completes (incremental checkpoints run one at a time),
        while an older one may be deleted meanwhile. Pieces are known by the
        identity of their object, which lives as long as the piece is unchanged.
        """
        assert self._checkpointing is not None
        if not any(isinstance(t, StatePieces) for t in tables.values()):
            return {}
        base = await self._checkpointing.coordinator.base_of.remote(checkpoint_id)
        for old in [c for c in self._written_pieces if base is None or c < base]:
            del self._written_pieces[old]  # older than the base: never named again
        return self._written_pieces.get(base, {}) if base is not None else {}

    async def notify_checkpoint_complete(self, checkpoint_id: int) -> None:
        """Checkpoint ``checkpoint_id`` is complete: a sink commits everything pre-committed up to it.

        Runs without the processing lock: the sink may be blocked on a row lock
        that only this commit releases. Commits take their own lock instead: a
        notification that arrives while an earlier commit runs (a commit slower
        than the checkpoint interval) waits for it, rather than committing the
        same transactions again beside it. What a failed commit leaves
        uncommitted is retried by the next notification.
        """
        if self._sink is None:
            return
        async with self._commit_lock:
            if self._sink.has_uncommitted(checkpoint_id):
                crash_point(self._plan.job, "sink.before_commit", self._subtask)
                await asyncio.to_thread(self._sink.commit_through, checkpoint_id)

    async def abort_checkpoint(self, checkpoint_id: int) -> None:
        """The coordinator gave up on ``checkpoint_id`` (only a subtask that aligns barriers cares)."""

    # -- two-phase commit without checkpoints ---------------------------------------

    async def commit(self) -> int:
        """Commit what the sink pre-committed at the end of input; return the committables count."""
        if self._sink is None:
            return 0
        return await asyncio.to_thread(self._sink.commit_final)

    async def abort(self) -> None:
        """Stop the sink's writes; without checkpoints, discard what it pre-committed at the end of input.

        With checkpoints, pre-committed transactions are left for recovery to
        resolve: one recorded in a complete checkpoint must still commit when
        the job resumes.
        """
        if self._sink is not None:
            await asyncio.to_thread(self._sink.abort, _ABORT_WAIT_S, discard_final=self._checkpointing is None)

    # -- observation ----------------------------------------------------------------

    def _input_watermark(self) -> int:
        return END_OF_TIME

    def _current_watermark(self) -> int:
        """The watermark the exported gauge shows: the input watermark (a source's: the one it emitted)."""
        return self._input_watermark()

    def metrics(self) -> SubtaskCounters:
        """What this subtask counted so far."""
        active = None
        if self._started_at is not None:
            active = (self._finished_at or time.monotonic()) - self._started_at
        return SubtaskCounters(
            task=self.task,
            is_source=self._vertex.is_source,
            operators=self._chain.metrics(),
            sink_rows=self._sink.rows if self._sink is not None else 0,
            backpressure_s=sum(g.backpressure_s for g in self._all_gates),
            messages_out=sum(g.messages for g in self._all_gates),
            input_watermark=self._input_watermark(),
            active_s=active,
            ended=self._ended,
            restored_from=self._restored_from,
            restored_from_cache=self._restored_tables["cache"],
            restored_from_storage=self._restored_tables["storage"],
            first_record_at=self._first_record_at,
            max_event_time=self._max_event_time(),
            node=self._node,
        )


class SourceSubtask(Subtask):
    """A subtask whose chain starts with a source: it reads in a loop and injects checkpoint barriers."""

    _reader: SourceReader
    _watermarks: WatermarkGenerator | SplitWatermarkGenerator | None
    """The source's watermark generator, if the source has one (the reader's own when it tracks splits)."""
    _emitted_watermark: int
    """The last watermark the source sent downstream (``NO_WATERMARK`` before the first)."""

    def _restore_input(self, restored: dict[str, list[pa.Table]]) -> None:
        node = self._vertex.nodes[0]
        offset, max_event_time = restored_position(restored.get(node.uid, []), self._subtask, self._vertex.parallelism)
        self._reader = node.spec.build(SourceContext(node.name, self._subtask, self._vertex.parallelism), offset)
        self._watermarks = None
        if node.watermark is not None and isinstance(self._reader, PerSplitWatermarks):
            with self._blame(0):
                self._watermarks = self._reader.split_watermarks(node.watermark, max_event_time)
        elif node.watermark is not None:
            self._watermarks = node.watermark.build(node.name, max_event_time)
        self._stop_requested = False
        self._reader_closed = False
        self._last_barrier = 0
        self._emitted_watermark = NO_WATERMARK

    def _max_event_time(self) -> int | None:
        return self._watermarks.max_event_time if self._watermarks is not None else None

    def _input_state(self) -> dict[str, pa.Table]:
        with self._blame(0):
            max_time = self._watermarks.max_event_time if self._watermarks is not None else None
            return {self._uids[0]: source_state(self._reader.offset(), max_time)}

    async def run(self) -> None:
        """Read the source until it ends (or ``stop``), pushing batches through the chain."""
        self._started_at = time.monotonic()
        try:
            # A restored source announces its watermark before its first batch, so the
            # channels downstream know it even if its event time never grows again.
            restored = self._watermarks.on_start() if self._watermarks is not None else None
            if restored is not None:
                async with self._lock:
                    await self._advance_watermark(restored)
            while not self._stop_requested:
                # Wait for credit before taking the lock, not inside a send under it: a backpressured
                # source stays free to take its snapshot when the coordinator triggers one.
                for gate in self._all_gates:
                    await gate.wait_for_credit()
                async with self._lock:
                    if self._failure is not None:
                        break
                    with self._blame(0):
                        item = self._reader.read()
                    if item is None:
                        break
                    if not isinstance(item, Idle):
                        with self._blame(0):
                            side = self._reader.take_side_outputs() if isinstance(self._reader, SideOutputs) else []
                        await self._read(item, side)
                    elif self._watermarks is not None:
                        # A split may have gone idle: the watermark can advance without rows.
                        with self._blame(0):
                            watermark = self._watermarks.on_idle()
                        if watermark is not None:
                            await self._advance_watermark(watermark)
                await asyncio.sleep(item.seconds if isinstance(item, Idle) else 0)
            if self._failure is None:
                async with self._lock:
                    await self._end_of_input()
        except BaseException as error:  # noqa: BLE001 - recorded, reported by done()
            self._fail(error, self._vertex.nodes[0].name)
        finally:
            if self._checkpointing is None:
                self._close_reader()

    async def _read(self, batch: pa.RecordBatch, side: Emitted) -> None:
        """Emit a read batch and the rows the reader set aside in the same step (one offset covers both)."""
        if self._first_record_at is None:
            self._first_record_at = time.time()
        await self._send(self._chain.on_source_rows(batch, side))
        if self._watermarks is not None:
            with self._blame(0):
                watermark = self._watermarks.on_batch(batch)
            if watermark is not None:
                await self._advance_watermark(watermark)

    async def _advance_watermark(self, watermark: int) -> None:
        await super()._advance_watermark(watermark)
        self._emitted_watermark = watermark

    def _current_watermark(self) -> int:
        return self._emitted_watermark

    def stop(self) -> None:
        """End the input now (a graceful, draining stop)."""
        self._stop_requested = True

    def _close_input(self) -> None:
        self._stop_requested = True
        try:
            self._close_reader()
        except Exception as error:  # noqa: BLE001 - the attempt is over; a reader that fails to close leaks at most
            log.warning("%s: closing the source's reader after the fence failed: %s", self._label, error)

    def _close_reader(self) -> None:
        if not self._reader_closed:
            self._reader_closed = True
            self._reader.close()

    async def trigger_checkpoint(self, checkpoint_id: int, triggered_at: float) -> None:
        """Snapshot the position and inject barrier ``checkpoint_id``."""
        async with self._lock:
            if self._failure is None and checkpoint_id > self._last_barrier:
                self._last_barrier = checkpoint_id
                try:
                    unaligned = self._checkpointing is not None and self._checkpointing.unaligned
                    await self._checkpoint(checkpoint_id, triggered_at, 0.0, unaligned=unaligned)
                except BaseException as error:  # noqa: BLE001 - recorded, reported by done()
                    self._fail(error, self._vertex.nodes[0].name)


class OperatorSubtask(Subtask):
    """A subtask fed by channels from upstream subtasks, through its input gate."""

    _input: InputGate

    def _restore_input(self, restored: dict[str, list[pa.Table]]) -> None:
        vertex = self._vertex
        setup = self._checkpointing
        timeout = setup.aligned_timeout_s if setup is not None else None
        may_unalign = setup is not None and (setup.unaligned or timeout is not None)
        self._piece_size = PieceSize(_PIECE_S) if may_unalign else None
        self._input = InputGate(vertex.input_channels, input_channel_names(self._plan, vertex.id, self._subtask),
                                operator=self.task, aligned_timeout_s=timeout,
                                chunk_bytes=self._piece_size.bytes if self._piece_size is not None else None,
                                feedback=vertex.feedback_channels)
        self._loop_inputs = self._plan.loop_input_channels(vertex.id)
        """The input channels from subtasks of this vertex's loop (none off a loop)."""
        self._outside_inputs = sorted(set(range(vertex.input_channels)) - set(self._loop_inputs))
        """The other input channels: a loop ends only once these ended."""
        self._loop_closed = False
        """A loop head ended its output (:meth:`end_loop`); what comes round now is only the end."""
        if restored.get(INPUT_WATERMARKS):
            self._input.watermarks.restore(restored[INPUT_WATERMARKS])
        if restored.get(CHANNEL_STATE):
            self._input.replay(replayed_channel_state(restored[CHANNEL_STATE], self._plan, vertex, self._subtask))
        self._processed = asyncio.Condition(self._lock)
        """Notified (under the processing lock) when messages were processed or the subtask failed."""
        self._recording: tuple[int, dict[str, pa.Table], dict[str, float]] | None = None
        """A snapshot taken, waiting for its channel state (unaligned, or a loop head's; at most one: a newer
        one subsumes it)."""

    def _channel_state_recorded(self, event: ChannelStateRecorded) -> None:
        """The in-flight messages of the snapshot are all recorded: persist it with them."""
        if self._recording is None or self._recording[0] != event.checkpoint_id:
            return
        checkpoint_id, tables, metrics = self._recording
        self._recording = None
        table = channel_state_table(event.messages, subtask=self._subtask, parallelism=self._vertex.parallelism)
        tables[CHANNEL_STATE] = table
        self._spawn(self._persist(checkpoint_id, tables, {**metrics, "channel_state_bytes": float(table.nbytes)}),
                    persist=True)

    def _input_state(self) -> dict[str, pa.Table]:
        return {INPUT_WATERMARKS: self._input.watermarks.snapshot()}

    def _fail(self, error: BaseException, operator: str | None = None) -> None:
        super()._fail(error, operator)
        if self._lock.locked():  # wake the pushes that wait for their message
            with contextlib.suppress(RuntimeError):
                self._processed.notify_all()

    async def _drain(self) -> None:
        """Process every input event the gate has now."""
        for event in self._input.drain():
            if isinstance(event, Rows):
                if self._loop_closed:
                    msg = (f"{self._label}: rows came round the loop after it ended; the loop's end was "
                           "decided wrongly (report this as a bug)")
                    raise RuntimeError(msg)
                if self._first_record_at is None:
                    self._first_record_at = time.time()
                started = time.perf_counter()
                await self._send(self._chain.on_input(event.batch))
                if self._piece_size is not None:
                    self._input.chunk_bytes = self._piece_size.observe(event.batch.nbytes,
                                                                       time.perf_counter() - started)
            elif isinstance(event, WatermarkAdvanced):
                await self._advance_watermark(event.watermark)
            elif isinstance(event, BarrierAligned) and not event.channel_state:
                await self._checkpoint(event.checkpoint_id, event.triggered_at, event.alignment_s)
            elif isinstance(event, BarrierAligned | UnalignedSnapshot):
                # Persisted once its channel state is recorded (_channel_state_recorded).
                unaligned = isinstance(event, UnalignedSnapshot)
                waited = event.waited_s if isinstance(event, UnalignedSnapshot) else event.alignment_s
                tables, metrics = await self._snapshot(event.checkpoint_id, event.triggered_at, waited,
                                                       unaligned=unaligned)
                self._recording = (event.checkpoint_id, tables, metrics)
            elif isinstance(event, ChannelStateRecorded):
                self._channel_state_recorded(event)
            elif isinstance(event, EndOfInput):
                if self._loop_closed:  # the head's own end came round: its output ended already
                    self._mark_ended()
                else:
                    await self._end_of_input()

    async def push(self, message: ChannelMessage) -> bool:
        """Process one channel message in sequence order; ``False`` if this subtask failed.

        Returns only once the message was processed, so a channel held back by
        barrier alignment keeps its sender's credit.
        """
        if self._failure is not None:
            return False
        if self._started_at is None:
            self._started_at = time.monotonic()
        channel = message.channel
        try:
            # At once, not behind the pushes waiting for the lock: an unaligned snapshot's channel
            # state is complete as soon as the messages before its barriers are here.
            self._input.receive(message)
        except BaseException as error:  # noqa: BLE001 - recorded, reported by done()
            self._fail(error)
            return False
        if channel >= self._input.forward:
            # Round a loop: the credit goes back on arrival. Waiting for processing would close a cycle of
            # waits (this subtask waits for credit downstream while the loop waits for this one).
            self._spawn(self._process_later())
            return True
        # A subtask wired before this one (a restored one replaying its channel state) may send at once.
        await self._connected.wait()
        async with self._processed:
            if self._failure is not None or not await self._process():
                return False
            await self._processed.wait_for(
                lambda: self._failure is not None or self._input.applied(channel) >= message.seq)
        return self._failure is None

    async def receive_barrier(self, channel: int, checkpoint_id: int, triggered_at: float, last_seq: int) -> None:
        """An unaligned barrier: it overtakes the messages of ``channel`` after ``last_seq`` that wait here.

        It reaches the input gate at once, without waiting for the processing
        lock behind the pushes of those messages; whoever holds the lock takes
        the snapshot at its next message boundary.
        """
        if self._failure is not None:
            return
        self._input.receive_barrier(channel, checkpoint_id, triggered_at, last_seq)
        await self._connected.wait()
        async with self._processed:
            await self._process()

    async def _process(self) -> bool:
        """Under the lock: process what the gate has now and wake the pushes waiting; ``False`` if it failed."""
        try:
            await self._drain()
        except BaseException as error:  # noqa: BLE001 - recorded, reported by done()
            self._fail(error)
            return False
        finally:
            self._processed.notify_all()
        return True

    async def connect(self, downstream: dict[int, list[ActorHandle]]) -> str:
        """Wire the output gates (:meth:`Subtask.connect`); a restored subtask replays its channel state now."""
        label = await super().connect(downstream)
        if not self._input.idle:
            self._spawn(self._process_later())
        return label

    async def _process_later(self) -> None:
        await self._connected.wait()
        async with self._processed:
            if self._failure is None:
                await self._process()

    async def loop_status(self) -> LoopStatus:
        """The counts of this subtask for deciding that its loop is empty (:mod:`~onceflow.runtime.loops`).

        Read under the processing lock, so never halfway through a message.
        """
        loop = self._vertex.loop
        async with self._lock:
            into_loop = [g for g in self._all_gates if self._plan.vertices[g.spec.target].loop == loop]
            return LoopStatus(
                self.task,
                # Barriers alone do not count: they carry no rows, and checkpoints would keep the loop going.
                sent=sum(g.data_messages for g in into_loop),
                processed=self._input.data_applied(self._loop_inputs),
                idle=self._input.idle and not any(g.pending for g in into_loop),
                inputs_ended=self._input.ended(self._outside_inputs),
            )

    async def end_loop(self) -> None:
        """A loop head: the loop is empty and its inputs ended, so end the output (it comes round as the end)."""
        async with self._processed:
            if self._loop_closed or self._failure is not None:
                return
            self._loop_closed = True
            try:
                await self._end_output()
            except BaseException as error:  # noqa: BLE001 - recorded, reported by done()
                self._fail(error)
                return
            await self._process()

    async def _tick(self) -> None:
        """Under the lock, from the linger timer: an alignment may have run past its timeout."""
        if self._input.aligned_timeout_s is not None:
            await self._process()

    async def abort_checkpoint(self, checkpoint_id: int) -> None:
        """The coordinator gave up on ``checkpoint_id``: stop aligning or recording it."""
        async with self._processed:
            if self._recording is not None and self._recording[0] == checkpoint_id:
                self._recording = None
            if self._input.abort_checkpoint(checkpoint_id):
                await self._process()

    def _input_watermark(self) -> int:
        return self._input.watermark


def write_pieces(storage: CheckpointStorage, checkpoint_id: int, task: str, operator: str, snapshot: StatePieces,
                 reusable: dict[int, tuple[object, StateHandle]],
                 written: dict[int, tuple[object, StateHandle]]) -> tuple[dict[str, Any], int]:
    """Write an incremental snapshot: its head, and the pieces ``reusable`` (the base's, by identity) lacks.

    Args:
        storage: the job's checkpoint storage.
        checkpoint_id: the checkpoint.
        task: the subtask.
        operator: the operator's uid.
        snapshot: the head and the pieces.
        reusable: the pieces the base checkpoint named: ``id(identity) -> (identity, handle)``.
        written: filled with every piece this checkpoint names (for the next one's ``reusable``).

    Returns:
        The manifest entry (``{"pieces": [head, ...], "bytes", "rows"}``) and the bytes written now.
    """
    head = storage.write_state(checkpoint_id, task, operator, snapshot.head)
    handles = [head]
    new_bytes = head.bytes
    for identity, piece in snapshot.pieces:
        known = reusable.get(id(identity))
        if known is not None and known[0] is identity:
            handle = known[1]
        else:
            handle = storage.write_shared(task, operator, piece)
            new_bytes += handle.bytes
        written[id(identity)] = (identity, handle)
        handles.append(handle)
    return ({"pieces": [h.to_manifest() for h in handles], "bytes": sum(h.bytes for h in handles),
             "rows": sum(h.rows for h in handles)}, new_bytes)


def _node_id() -> str:
    """The Ray node this process runs on (``""`` outside Ray): a failure report names it."""
    if not ray.is_initialized():
        return ""
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - informational only
        return ""


def subtask_class(vertex: VertexSpec) -> type[Subtask]:
    """The subtask class that runs ``vertex``."""
    return SourceSubtask if vertex.is_source else OperatorSubtask
