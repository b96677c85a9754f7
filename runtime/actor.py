"""The subtask actor: one per subtask of a vertex (a chain of fused operators).

The actor is a thin adapter. It builds the chain's live logic (from a restored
snapshot when the job recovers), accepts :class:`~onceflow.runtime.channel.ChannelMessage`
calls (``push``), puts them back in sequence order, aligns checkpoint barriers
(:class:`~onceflow.checkpoint.barrier_handler.AlignedBarrierHandler`), tracks input
watermarks, runs the chain, and hands outputs to its
:class:`~onceflow.runtime.output.OutputGate` objects. A source vertex runs its own read
loop (``run``) and injects barriers when the coordinator triggers a checkpoint.

Everything that touches operator state runs under one asyncio lock, so
operator logic never sees two events at once. A ``push`` returns (and so
gives its sender the credit back) only once its message was applied: a channel
blocked by barrier alignment holds its sender back, as in Flink.

Snapshots have a synchronous part (under the lock: every stage returns an
immutable Arrow table, the sink pre-commits, the barrier goes downstream) and
an asynchronous part (``ray.put`` owned by the coordinator, the Arrow IPC file
in durable storage, the acknowledgement) that runs while processing goes on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import ray

from onceflow.checkpoint.barrier_handler import AbortAlignment, AlignedBarrierHandler, Release, Snapshot
from onceflow.checkpoint.coordinator import TaskAck
from onceflow.checkpoint.state import read_source_state, sink_state, source_state
from onceflow.checkpoint.storage import CheckpointStorage
from onceflow.checkpoint.two_phase_commit import Committable, SinkContext, SinkWriter
from onceflow.errors import OnceflowError, OperatorError
from onceflow.operators.keygroups import key_group_range
from onceflow.operators.logic import MAIN, Emitted, OperatorContext, OperatorLogic
from onceflow.operators.sources.base import Idle, RescaledOffsets, SourceContext, SourceReader
from onceflow.runtime.channel import (
    END_OF_TIME,
    INPUT_WATERMARKS,
    ChannelMessage,
    ChannelReceiver,
    InputWatermarks,
    input_channel_names,
)
from onceflow.runtime.dataflow import NodeKind
from onceflow.runtime.output import DownstreamFailedError, OutputGate
from onceflow.runtime.telemetry import SubtaskMetrics
from onceflow.testing.failpoints import crash_point

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ray.actor import ActorHandle

    from onceflow.operators.watermark import WatermarkGenerator
    from onceflow.runtime.plan import PhysicalPlan, VertexSpec

__all__ = ["AttemptId", "CheckpointSetup", "RestoredState", "RuntimeOptions", "SubtaskActor", "SubtaskRestore",
           "configure_logging"]

log = logging.getLogger("onceflow")

_ABORT_WAIT_S = 5.0
"""How long an abort waits for a sink write in progress (the job waits 10 s for every abort)."""


@dataclass(frozen=True, slots=True)
class RuntimeOptions:
    """Data-plane settings shared by every subtask of a job.

    Attributes:
        batch_bytes: a channel sends once it buffers this many bytes (4 MiB
            measured best on the feature-window benchmark: far above Ray's
            100 KiB inline-argument cliff, where transport per row is cheapest).
        linger_s: a channel sends buffered rows at the latest after this long.
        log_level: the level of the ``onceflow`` logger in the actors (the
            driver's, when the job starts).
        credits: unacknowledged messages per channel (bounds memory in flight).
            Two keep the pipeline full on the feature-window benchmark and halve
            the data a barrier queues behind (checkpoint p99 0.8 s -> 0.6 s)
            compared with four.
    """

    batch_bytes: int = 4 << 20
    linger_s: float = 0.05
    credits: int = 2
    log_level: int = logging.WARNING


def configure_logging(level: int) -> None:
    """In an actor process: log ``onceflow`` records at ``level`` to stderr (Ray forwards it to the driver)."""
    logger = logging.getLogger("onceflow")
    logger.setLevel(level)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


@dataclass(frozen=True, slots=True)
class CheckpointSetup:
    """How a subtask takes part in checkpoints.

    Attributes:
        coordinator: the ``<job>/coordinator`` actor (owns the cached snapshots).
        storage: the durable storage URI of ``CheckpointConfig.storage``.
    """

    coordinator: ActorHandle
    storage: str


@dataclass(frozen=True, slots=True)
class AttemptId:
    """Which run of a job, and which attempt of that run, an actor belongs to.

    Attributes:
        run: the run's id (a fresh run gets a new one; ``resume=True`` too).
        number: the attempt (1 for the first deployment, one more per restart);
            the coordinator ignores acknowledgements of any other attempt.
    """

    run: str = ""
    number: int = 0


@dataclass(frozen=True, slots=True)
class RestoredState:
    """Where one operator's state of one subtask is kept in a checkpoint.

    Attributes:
        path: the Arrow IPC file in durable storage.
        cached: a Ray object reference to the same table, or ``None`` when the
            object store copy is gone (the coordinator restarted).
    """

    path: str
    cached: Any = None


@dataclass(slots=True)
class SubtaskRestore:
    """What one subtask restores: state key (operator uid, or ``@`` runtime entry) -> the handles to load.

    Decided by :func:`onceflow.runtime.restore.assign_restored_state`: several handles
    when state of several old subtasks lands here (rescaling).
    """

    checkpoint_id: int
    states: dict[str, list[RestoredState]] = field(default_factory=dict)


class _SinkStage(OperatorLogic):
    """Adapts a sink writer to the chain: writes batches, pre-commits on barriers and at the end."""

    def __init__(self, writer: SinkWriter) -> None:
        self.writer = writer
        self.rows = 0
        self.uncommitted: dict[int, list[Committable]] = {}
        self.final: list[Committable] = []
        self.aborted = False
        self._writing = threading.Lock()  # writes and the abort run in worker threads

    def on_batch(self, batch: pa.RecordBatch) -> Emitted:
        with self._writing:
            if self.aborted:  # the job failed: nothing written now could ever commit
                return []
            self.writer.write(batch)
            self.rows += batch.num_rows
        return []

    def abort(self, wait_s: float) -> None:
        """Abort the writer once the write in progress returns; later writes are dropped.

        A write blocked on its external system (a row lock that only a commit
        releases) is waited for at most ``wait_s``, then the writer is aborted
        under it.
        """
        self.aborted = True
        acquired = self._writing.acquire(timeout=wait_s)
        try:
            self.writer.abort()
        finally:
            if acquired:
                self._writing.release()

    def pre_commit(self, checkpoint_id: int) -> pa.Table:
        self.writer.flush(end_of_input=False)
        committables = self.writer.prepare_commit(checkpoint_id)
        if committables:
            self.uncommitted[checkpoint_id] = committables
        return sink_state(self.uncommitted)


class SubtaskActor:
    """Runs one subtask of one vertex. Created by the job as a named async Ray actor."""

    def __init__(self, plan: PhysicalPlan, vertex_id: int, subtask: int, options: RuntimeOptions,
                 checkpointing: CheckpointSetup | None = None, restore: SubtaskRestore | None = None,
                 attempt: AttemptId | None = None) -> None:
        configure_logging(options.log_level)
        self._plan = plan
        self._attempt = attempt or AttemptId()
        self._vertex: VertexSpec = plan.vertices[vertex_id]
        self._subtask = subtask
        self._options = options
        self._checkpointing = checkpointing
        self.task = f"{self._vertex.name}/{subtask}"
        self._label = f"{plan.job}/{self.task}"
        self._storage = CheckpointStorage(checkpointing.storage, plan.job) if checkpointing else None
        vertex = self._vertex
        self._reader: SourceReader | None = None
        self._watermarks_out: WatermarkGenerator | None = None
        self._stages: list[OperatorLogic | None] = []
        self._sink: _SinkStage | None = None
        self._sink_spec: Any = None
        self._records_in = [0] * len(vertex.nodes)
        self._records_out = [0] * len(vertex.nodes)
        self._restored_from = restore.checkpoint_id if restore else None
        restored = {key: [self._load(key, handle) for handle in handles]
                    for key, handles in (restore.states if restore else {}).items()}
        for node in vertex.nodes:
            if node.kind is NodeKind.SOURCE:
                offset, max_event_time = self._restored_position(restored.get(node.uid, []))
                self._reader = node.spec.build(SourceContext(node.name, subtask, vertex.parallelism), offset)
                if node.watermark is not None:
                    self._watermarks_out = node.watermark.build(node.name, max_event_time)
                self._stages.append(None)
            elif node.kind is NodeKind.SINK:
                self._sink_spec = node.spec
                self._sink = _SinkStage(node.spec.create_writer(self._sink_context()))
                # The restored checkpoint's transactions were resolved by the job before this attempt deployed.
                self._stages.append(self._sink)
            else:
                op_ctx = OperatorContext(
                    node.name, subtask, vertex.parallelism, plan.max_parallelism,
                    key_group_range(subtask, vertex.parallelism, plan.max_parallelism),
                )
                tables = restored.get(node.uid)
                if tables:
                    # Several tables (rescaling) go over as a sequence, each with its own metadata;
                    # the operator keeps the rows of its own key groups.
                    resume = tables[0] if len(tables) == 1 else tables
                    self._stages.append(node.spec.build(op_ctx, resume_state=resume))
                else:
                    self._stages.append(node.spec.build(op_ctx))
        channels = vertex.input_channels
        self._receivers = [ChannelReceiver() for _ in range(channels)]
        self._held: list[collections.deque[ChannelMessage]] = [collections.deque() for _ in range(channels)]
        self._applied = [-1] * channels
        self._eof = [False] * channels
        self._watermarks_in = InputWatermarks(channels, input_channel_names(plan, vertex_id, subtask),
                                              operator=self.task)
        if restored.get(INPUT_WATERMARKS):
            self._watermarks_in.restore(restored[INPUT_WATERMARKS])
        self._barriers = AlignedBarrierHandler(channels, time.monotonic)
        self._gates: dict[tuple[int, int], list[OutputGate]] = {}
        self._failure: BaseException | None = None
        self._stop_requested = False
        self._ended = False
        self._finished_at: float | None = None
        self._started_at: float | None = None
        self._lock: asyncio.Lock | None = None
        self._commit_lock: asyncio.Lock | None = None
        self._applied_changed: asyncio.Condition | None = None
        self._finished: asyncio.Event | None = None
        self._failed: asyncio.Event | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._checkpoint_metrics: list[dict[str, float]] = []
        self._last_barrier = 0
        self._first_record_at: float | None = None
        self._telemetry = SubtaskMetrics(plan.job, vertex.operators, subtask)

    def _sink_context(self) -> SinkContext:
        return SinkContext(self._plan.job, self._vertex.nodes[-1].name, self._subtask, self._vertex.parallelism,
                           run=self._attempt.run, attempt=self._attempt.number)

    def _restored_position(self, tables: list[pa.Table]) -> tuple[Any, int | None]:
        """Return a source's resume offset and max event time from the old readers' states (old subtask order).

        At an unchanged parallelism the subtask resumes from its own reader's
        state; at another one the readers take the old ones over together
        (:class:`RescaledOffsets`), and event time restarts from the lowest old
        maximum, so no row becomes late because of the rescale.
        """
        if not tables:
            return None, None
        positions = [read_source_state(table) for table in tables]
        if len(positions) == self._vertex.parallelism:
            return positions[self._subtask]
        times = [t for _, t in positions]
        lowest = None if any(t is None for t in times) else min(t for t in times if t is not None)
        return RescaledOffsets(tuple(o for o, _ in positions)), lowest

    def _load(self, operator: str, handle: RestoredState) -> pa.Table:
        if handle.cached is not None:
            with contextlib.suppress(Exception):
                table = ray.get(handle.cached, timeout=30)
                if isinstance(table, pa.Table):
                    return table
        assert self._storage is not None
        return self._storage.read_state(handle.path)

    # -- wiring ---------------------------------------------------------------------

    async def connect(self, downstream: dict[int, list[ActorHandle]]) -> str:
        """Receive the handles of downstream subtasks; start the linger timer."""
        self._lock = asyncio.Lock()
        self._commit_lock = asyncio.Lock()
        self._applied_changed = asyncio.Condition(self._lock)
        self._finished = asyncio.Event()
        self._failed = asyncio.Event()
        for spec in self._vertex.outputs:
            gate = OutputGate(
                spec, self._subtask, downstream[spec.target], operator=self._vertex.nodes[spec.stage].name,
                max_parallelism=self._plan.max_parallelism, credits=self._options.credits,
                batch_bytes=self._options.batch_bytes,
            )
            self._gates.setdefault((spec.stage, spec.port), []).append(gate)
        self._spawn(self._linger_loop())
        return self._label

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _all_gates(self) -> list[OutputGate]:
        return [gate for group in self._gates.values() for gate in group]

    async def _linger_loop(self) -> None:
        assert self._lock is not None
        gates = self._all_gates()
        if not gates:
            return
        period = max(self._options.linger_s / 2, 0.001)
        published = time.monotonic()
        while self._failure is None:
            await asyncio.sleep(period)
            if time.monotonic() - published >= 1.0:
                published = time.monotonic()
                self._telemetry.publish(self._records_in, self._records_out,
                                        sum(g.backpressure_s for g in gates))
            async with self._lock:
                try:
                    for gate in gates:
                        await gate.flush_lingering(self._options.linger_s)
                except BaseException as error:  # noqa: BLE001 - recorded, reported by done()
                    self._fail(error, stage=None)
                    return

    # -- processing -----------------------------------------------------------------

    def _fail(self, error: BaseException, stage: int | None) -> None:
        if self._failure is not None:
            return
        if isinstance(error, OnceflowError | DownstreamFailedError):
            self._failure = error
        else:
            name = self._vertex.nodes[stage].name if stage is not None else self._vertex.name
            msg = f"operator {name!r} (subtask {self._subtask}) failed: {type(error).__name__}: {error}"
            wrapped = OperatorError(msg, operator=name, subtask=self._subtask)
            wrapped.__cause__ = error
            self._failure = wrapped
        if not isinstance(error, DownstreamFailedError):
            log.error("%s failed: %s", self._label, self._failure)
        if self._finished is not None and self._failed is not None:
            self._finished.set()
            self._failed.set()
        if self._applied_changed is not None and self._lock is not None and self._lock.locked():
            with contextlib.suppress(RuntimeError):
                self._applied_changed.notify_all()

    @contextlib.contextmanager
    def _blame(self, stage: int) -> Iterator[None]:
        """Record an exception raised inside as a failure of operator ``stage``, then re-raise it."""
        try:
            yield
        except Exception as error:
            self._fail(error, stage)
            raise

    async def _route(self, stage: int, emitted: Emitted) -> None:
        for port, batch in emitted:
            if batch.num_rows == 0:
                continue
            self._records_out[stage] += batch.num_rows
            if port == MAIN and stage + 1 < len(self._stages):
                await self._deliver(stage + 1, batch)
            for gate in self._gates.get((stage, port), ()):
                await gate.send(batch)

    async def _deliver(self, stage: int, batch: pa.RecordBatch) -> None:
        if self._first_record_at is None:
            self._first_record_at = time.time()
        self._records_in[stage] += batch.num_rows
        logic = self._stages[stage]
        assert logic is not None
        with self._blame(stage):
            if self._sink is not None and logic is self._sink:
                # A sink may block on its external system (a row lock held by a
                # prepared transaction that only our own commit releases): keep
                # the event loop free so that notify_checkpoint_complete can run.
                await asyncio.to_thread(self._sink.on_batch, batch)
                crash_point(self._plan.job, "sink.after_write", self._subtask)
                return
            emitted = logic.on_batch(batch)
        await self._route(stage, emitted)

    async def _advance_watermark(self, watermark: int) -> None:
        for stage, logic in enumerate(self._stages):
            if logic is not None:
                with self._blame(stage):
                    emitted = logic.on_watermark(watermark)
                await self._route(stage, emitted)
        for gate in self._all_gates():
            gate.set_watermark(watermark)

    async def _end_of_input(self) -> None:
        for stage, logic in enumerate(self._stages):
            if logic is not None:
                with self._blame(stage):
                    emitted = logic.on_eof()
                await self._route(stage, emitted)
        for gate in self._all_gates():
            gate.set_watermark(END_OF_TIME)
            await gate.close()
        if self._sink is not None and self._checkpointing is None:
            # Without checkpoints the job commits once, after every subtask ended.
            self._sink.writer.flush(end_of_input=True)
            self._sink.final = self._sink.writer.prepare_commit()
        self._ended = True
        self._finished_at = time.monotonic()
        assert self._finished is not None
        self._finished.set()

    async def _apply(self, message: ChannelMessage) -> None:
        batch = message.batch
        if batch is not None and batch.num_rows:
            self._watermarks_in.on_rows(message.channel)
        done = 0
        for rows, watermark in message.watermarks:
            if batch is not None and rows > done:
                await self._deliver(0, batch.slice(done, rows - done))
                done = rows
            advanced = self._watermarks_in.update(message.channel, watermark)
            if advanced is not None:
                await self._advance_watermark(advanced)
        if batch is not None and batch.num_rows > done:
            await self._deliver(0, batch.slice(done) if done else batch)
        if message.barrier is not None:
            checkpoint_id, triggered_at = message.barrier
            for action in self._barriers.on_barrier(message.channel, checkpoint_id):
                if isinstance(action, Snapshot):
                    await self._snapshot(action.checkpoint_id, triggered_at, action.alignment_s)
                elif isinstance(action, AbortAlignment):
                    log.debug("%s: alignment of checkpoint %d abandoned", self._label, action.checkpoint_id)
                # Block and Release need nothing here: _drain asks is_blocked() before every message.
        if message.eof:
            self._eof[message.channel] = True
            advanced = self._watermarks_in.update(message.channel, END_OF_TIME)
            if advanced is not None and advanced < END_OF_TIME:
                await self._advance_watermark(advanced)
            if all(self._eof):
                await self._end_of_input()

    async def _drain(self) -> None:
        """Apply every held message whose channel is not blocked, until none is left."""
        progress = True
        while progress:
            progress = False
            for channel, held in enumerate(self._held):
                while held and not self._barriers.is_blocked(channel):
                    message = held.popleft()
                    self._applied[channel] = message.seq
                    await self._apply(message)
                    progress = True

    async def push(self, message: ChannelMessage) -> bool:
        """Apply one channel message in sequence order; ``False`` if this subtask failed.

        Returns only once the message was applied, so a channel blocked by
        barrier alignment keeps its sender's credit.
        """
        assert self._applied_changed is not None
        if self._failure is not None:
            return False
        if self._started_at is None:
            self._started_at = time.monotonic()
        channel = message.channel
        async with self._applied_changed:
            if self._failure is not None:
                return False
            try:
                self._held[channel].extend(self._receivers[channel].accept(message))
                await self._drain()
            except BaseException as error:  # noqa: BLE001 - recorded, reported by done()
                self._fail(error, stage=None)
                return False
            finally:
                self._applied_changed.notify_all()
            await self._applied_changed.wait_for(
                lambda: self._failure is not None or self._applied[channel] >= message.seq)
        return self._failure is None

    async def run(self) -> None:
        """Read the source until it ends (or ``stop``), pushing batches through the chain."""
        assert self._reader is not None and self._lock is not None
        self._started_at = time.monotonic()
        reader = self._reader
        try:
            # A restored source announces its watermark before its first batch, so the
            # channels downstream know it even if its event time never grows again.
            restored = self._watermarks_out.on_start() if self._watermarks_out is not None else None
            if restored is not None:
                async with self._lock:
                    await self._advance_watermark(restored)
            while not self._stop_requested:
                async with self._lock:
                    if self._failure is not None:
                        break
                    item = reader.read()
                    if item is None:
                        break
                    if not isinstance(item, Idle):
                        if self._first_record_at is None:
                            self._first_record_at = time.time()
                        await self._route(0, [(MAIN, item)])
                        if self._watermarks_out is not None:
                            watermark = self._watermarks_out.on_batch(item)
                            if watermark is not None:
                                await self._advance_watermark(watermark)
                await asyncio.sleep(item.seconds if isinstance(item, Idle) else 0)
            if self._failure is None:
                async with self._lock:
                    await self._end_of_input()
        except BaseException as error:  # noqa: BLE001 - recorded, reported by done()
            self._fail(error, stage=0)
        finally:
            if self._checkpointing is None:
                reader.close()

    def stop(self) -> None:
        """Ask a source to end its input now (a graceful, draining stop)."""
        self._stop_requested = True

    async def done(self) -> None:
        """Return when this subtask processed its end of input; raise its failure if it failed."""
        assert self._finished is not None
        await self._finished.wait()
        if self._failure is not None:
            raise self._failure

    async def watch(self) -> None:
        """Return only if this subtask fails (raising its failure); for the job's supervision."""
        assert self._failed is not None
        await self._failed.wait()
        assert self._failure is not None
        raise self._failure

    # -- checkpoints ----------------------------------------------------------------

    async def trigger_checkpoint(self, checkpoint_id: int, triggered_at: float) -> None:
        """Source subtasks only: snapshot the position and inject barrier ``checkpoint_id``."""
        assert self._lock is not None
        async with self._lock:
            if self._failure is None and checkpoint_id > self._last_barrier:
                try:
                    await self._snapshot(checkpoint_id, triggered_at, 0.0)
                except BaseException as error:  # noqa: BLE001 - recorded, reported by done()
                    self._fail(error, stage=0)

    async def _snapshot(self, checkpoint_id: int, triggered_at: float, alignment_s: float) -> None:
        """The synchronous part, under the lock: state tables, pre-commit, barrier downstream."""
        started = time.monotonic()
        self._last_barrier = checkpoint_id
        tables: dict[str, pa.Table] = {}
        for stage, node in enumerate(self._vertex.nodes):
            logic = self._stages[stage]
            with self._blame(stage):
                if node.kind is NodeKind.SOURCE:
                    assert self._reader is not None
                    max_time = self._watermarks_out.max_event_time if self._watermarks_out else None
                    tables[node.uid] = source_state(self._reader.offset(), max_time)
                elif logic is self._sink and self._sink is not None:
                    tables[node.uid] = self._sink.pre_commit(checkpoint_id)
                    crash_point(self._plan.job, "sink.after_pre_commit", self._subtask)
                elif logic is not None:
                    table = logic.snapshot()
                    if table is not None:
                        tables[node.uid] = table
        if self._vertex.input_channels:
            tables[INPUT_WATERMARKS] = self._watermarks_in.snapshot()
        for gate in self._all_gates():
            await gate.barrier(checkpoint_id, triggered_at)
        metrics = {
            "sync_s": time.monotonic() - started,
            "alignment_s": alignment_s,
            "start_delay_s": max(time.time() - triggered_at - alignment_s, 0.0),
        }
        self._spawn(self._persist(checkpoint_id, tables, metrics))

    async def _persist(self, checkpoint_id: int, tables: dict[str, pa.Table], metrics: dict[str, float]) -> None:
        """The asynchronous part: cache in the object store, write durably, acknowledge."""
        assert self._checkpointing is not None and self._storage is not None
        coordinator = self._checkpointing.coordinator
        started = time.monotonic()
        try:
            states: dict[str, dict[str, Any]] = {}
            cache: dict[str, Any] = {}
            for operator, table in tables.items():
                handle = await asyncio.to_thread(self._storage.write_state, checkpoint_id, self.task, operator, table)
                states[operator] = {"path": handle.path, "bytes": handle.bytes, "rows": handle.rows}
                with contextlib.suppress(Exception):  # the cache is optional; the file is not
                    cache[operator] = await asyncio.to_thread(ray.put, table, _owner=coordinator)
            metrics = {**metrics, "async_s": time.monotonic() - started,
                       "state_bytes": float(sum(s["bytes"] for s in states.values()))}
            self._checkpoint_metrics.append({"checkpoint_id": checkpoint_id, **metrics})
            log.debug("%s: checkpoint %d snapshot: sync %.3f s, async %.3f s, alignment %.3f s, %d bytes",
                      self._label, checkpoint_id, metrics["sync_s"], metrics["async_s"], metrics["alignment_s"],
                      int(metrics["state_bytes"]))
            coordinator.acknowledge.remote(checkpoint_id, TaskAck(self.task, states, cache, metrics,
                                                                      attempt=self._attempt.number))
        except Exception as error:  # noqa: BLE001 - a failed snapshot declines the checkpoint
            log.warning("%s: checkpoint %d failed: %s", self._label, checkpoint_id, error)
            coordinator.decline.remote(checkpoint_id, self.task, str(error))

    async def notify_checkpoint_complete(self, checkpoint_id: int) -> None:
        """Checkpoint ``checkpoint_id`` is complete: a sink commits everything pre-committed up to it.

        Runs without the processing lock: the sink may be blocked on a row lock
        that only this commit releases. Commits take their own lock instead: a
        notification that arrives while an earlier commit runs (a commit slower
        than the checkpoint interval) waits for it, rather than committing the
        same transactions again beside it. What a failed commit leaves in
        ``uncommitted`` is retried by the next notification.
        """
        if self._sink is None:
            return
        assert self._commit_lock is not None
        async with self._commit_lock:
            ready = sorted(c_id for c_id in self._sink.uncommitted if c_id <= checkpoint_id)
            committables = [c for c_id in ready for c in self._sink.uncommitted[c_id]]
            if committables:
                crash_point(self._plan.job, "sink.before_commit", self._subtask)
                committer = self._sink_spec.create_committer(self._sink_context())
                await asyncio.to_thread(committer.commit, committables)
            for c_id in ready:
                self._sink.uncommitted.pop(c_id, None)

    async def abort_checkpoint(self, checkpoint_id: int) -> None:
        """The coordinator gave up on ``checkpoint_id``: stop aligning it."""
        assert self._applied_changed is not None
        async with self._applied_changed:
            actions = self._barriers.on_checkpoint_aborted(checkpoint_id)
            if any(isinstance(a, Release) for a in actions):
                try:
                    await self._drain()
                except BaseException as error:  # noqa: BLE001 - recorded, reported by done()
                    self._fail(error, stage=None)
                self._applied_changed.notify_all()

    # -- two-phase commit without checkpoints ---------------------------------------

    async def commit(self) -> int:
        """Commit what the sink pre-committed at the end of input; return the committables count."""
        return await asyncio.to_thread(self._commit)

    def _commit(self) -> int:
        if self._sink is None:
            return 0
        self._sink_spec.create_committer(self._sink_context()).commit(self._sink.final)
        return len(self._sink.final)

    async def abort(self) -> None:
        """Discard everything this subtask's sink wrote or pre-committed and never committed."""
        await asyncio.to_thread(self._abort)

    def _abort(self) -> None:
        if self._sink is None:
            return
        with contextlib.suppress(Exception):
            self._sink.abort(wait_s=_ABORT_WAIT_S)
        if self._checkpointing is None:
            self._sink_spec.create_committer(self._sink_context()).abort(self._sink.final)
        # With checkpoints, pre-committed transactions are left for recovery to resolve:
        # one recorded in a complete checkpoint must still commit when the job resumes.

    # -- observation ----------------------------------------------------------------

    def metrics(self) -> dict[str, Any]:
        """Counters of this subtask, per chained operator."""
        operators = {}
        for stage, node in enumerate(self._vertex.nodes):
            logic = self._stages[stage]
            extra = logic.metrics() if logic is not None else {}
            operators[node.name] = {"records_in": self._records_in[stage], "records_out": self._records_out[stage],
                                    **extra}
        gates = self._all_gates()
        busy = None
        if self._started_at is not None:
            busy = (self._finished_at or time.monotonic()) - self._started_at
        return {
            "actor": self._label,
            "task": self.task,
            "vertex": self._vertex.name,
            "subtask": self._subtask,
            "is_source": self._vertex.is_source,
            "sink_rows": self._sink.rows if self._sink is not None else 0,
            "operators": operators,
            "backpressure_s": sum(g.backpressure_s for g in gates),
            "messages_out": sum(g.messages for g in gates),
            "duplicates_dropped": sum(r.duplicates for r in self._receivers),
            "input_watermark": self._watermarks_in.current,
            "active_s": busy,
            "ended": self._ended,
            "restored_from": self._restored_from,
            "first_record_at": self._first_record_at,
            "checkpoints": list(self._checkpoint_metrics),
        }
