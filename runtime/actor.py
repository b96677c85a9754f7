"""The subtask actor: one per subtask of a vertex (a chain of fused operators).

The actor is a thin adapter. It builds the chain's live logic, accepts
:class:`~runtime.channel.ChannelMessage` calls (``push``), puts them back in
sequence order, tracks input watermarks, runs the chain, and hands outputs to
its :class:`~runtime.output.OutputGate` objects. A source vertex runs its own
read loop (``run``). Everything an actor does is serialised by one asyncio
lock, so operator logic never sees two batches at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from checkpoint.errors import OnceflowError, OperatorError
from checkpoint.two_phase_commit import Committable, SinkContext, SinkWriter
from operators.keygroups import key_group_range
from operators.logic import MAIN, Emitted, OperatorContext, OperatorLogic
from operators.sources.base import Idle, SourceContext, SourceReader
from runtime.channel import END_OF_TIME, ChannelMessage, ChannelReceiver, InputWatermarks
from runtime.dataflow import NodeKind
from runtime.output import DownstreamFailedError, OutputGate

if TYPE_CHECKING:
    import pyarrow as pa
    from ray.actor import ActorHandle

    from operators.watermark import WatermarkGenerator
    from runtime.plan import PhysicalPlan, VertexSpec

__all__ = ["RuntimeOptions", "SubtaskActor"]

log = logging.getLogger("onceflow")


@dataclass(frozen=True, slots=True)
class RuntimeOptions:
    """Data-plane settings shared by every subtask of a job.

    Attributes:
        batch_bytes: a channel sends once it buffers this many bytes (4 MiB
            measured best on the feature-window benchmark: far above Ray's
            100 KiB inline-argument cliff, where transport per row is cheapest).
        linger_s: a channel sends buffered rows at the latest after this long.
        credits: unacknowledged messages per channel (bounds memory in flight).

    """

    batch_bytes: int = 4 << 20
    linger_s: float = 0.05
    credits: int = 4


class _SinkStage(OperatorLogic):
    """Adapts a sink writer to the chain: writes batches, pre-commits at the end."""

    def __init__(self, writer: SinkWriter) -> None:
        self.writer = writer
        self.rows = 0
        self.committables: list[Committable] = []

    def on_batch(self, batch: pa.RecordBatch) -> Emitted:
        self.writer.write(batch)
        self.rows += batch.num_rows
        return []

    def on_eof(self) -> Emitted:
        self.writer.flush(end_of_input=True)
        self.committables = self.writer.prepare_commit()
        return []


class SubtaskActor:
    """Runs one subtask of one vertex. Created by the job as a named async Ray actor."""

    def __init__(self, plan: PhysicalPlan, vertex_id: int, subtask: int, options: RuntimeOptions) -> None:
        self._plan = plan
        self._vertex: VertexSpec = plan.vertices[vertex_id]
        self._subtask = subtask
        self._options = options
        self._label = f"{plan.job}/{self._vertex.name}/{subtask}"
        vertex = self._vertex
        self._reader: SourceReader | None = None
        self._watermarks_out: WatermarkGenerator | None = None
        self._stages: list[OperatorLogic | None] = []
        self._sink: _SinkStage | None = None
        self._sink_spec: Any = None
        self._records_in = [0] * len(vertex.nodes)
        self._records_out = [0] * len(vertex.nodes)
        for node in vertex.nodes:
            if node.kind is NodeKind.SOURCE:
                ctx = SourceContext(node.name, subtask, vertex.parallelism)
                self._reader = node.spec.build(ctx)
                if node.watermark is not None:
                    self._watermarks_out = node.watermark.build(node.name)
                self._stages.append(None)
            elif node.kind is NodeKind.SINK:
                sink_ctx = SinkContext(plan.job, node.name, subtask, vertex.parallelism)
                self._sink_spec = node.spec
                self._sink = _SinkStage(node.spec.create_writer(sink_ctx))
                self._stages.append(self._sink)
            else:
                op_ctx = OperatorContext(
                    node.name, subtask, vertex.parallelism, plan.max_parallelism,
                    key_group_range(subtask, vertex.parallelism, plan.max_parallelism),
                )
                self._stages.append(node.spec.build(op_ctx))
        self._receivers = [ChannelReceiver() for _ in range(vertex.input_channels)]
        self._eof = [False] * vertex.input_channels
        self._watermarks_in = InputWatermarks(vertex.input_channels)
        self._gates: dict[tuple[int, int], list[OutputGate]] = {}
        self._failure: BaseException | None = None
        self._stop_requested = False
        self._finished_at: float | None = None
        self._started_at: float | None = None
        self._lock: asyncio.Lock | None = None
        self._finished: asyncio.Event | None = None
        self._linger_task: asyncio.Task[None] | None = None

    # -- wiring ---------------------------------------------------------------------

    async def connect(self, downstream: dict[int, list[ActorHandle]]) -> str:
        """Receive the handles of downstream subtasks; start the linger timer."""
        self._lock = asyncio.Lock()
        self._finished = asyncio.Event()
        for spec in self._vertex.outputs:
            gate = OutputGate(
                spec, self._subtask, downstream[spec.target], operator=self._vertex.nodes[spec.stage].name,
                max_parallelism=self._plan.max_parallelism, credits=self._options.credits,
                batch_bytes=self._options.batch_bytes,
            )
            self._gates.setdefault((spec.stage, spec.port), []).append(gate)
        self._linger_task = asyncio.get_running_loop().create_task(self._linger_loop())
        if self._vertex.input_channels == 0 and not self._vertex.is_source:
            msg = f"vertex {self._vertex.name!r} has no inputs"
            raise OnceflowError(msg)
        return self._label

    async def _linger_loop(self) -> None:
        assert self._lock is not None
        gates = [gate for group in self._gates.values() for gate in group]
        if not gates:
            return
        period = max(self._options.linger_s / 2, 0.001)
        while True:
            await asyncio.sleep(period)
            if self._finished is not None and self._finished.is_set():
                return
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
        if self._finished is not None:
            self._finished.set()

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
        self._records_in[stage] += batch.num_rows
        logic = self._stages[stage]
        assert logic is not None
        try:
            emitted = logic.on_batch(batch)
        except Exception as error:
            self._fail(error, stage)
            raise
        await self._route(stage, emitted)

    async def _advance_watermark(self, watermark: int) -> None:
        for stage, logic in enumerate(self._stages):
            if logic is not None:
                try:
                    emitted = logic.on_watermark(watermark)
                except Exception as error:
                    self._fail(error, stage)
                    raise
                await self._route(stage, emitted)
        for group in self._gates.values():
            for gate in group:
                gate.set_watermark(watermark)

    async def _end_of_input(self) -> None:
        for stage, logic in enumerate(self._stages):
            if logic is not None:
                try:
                    emitted = logic.on_eof()
                except Exception as error:
                    self._fail(error, stage)
                    raise
                await self._route(stage, emitted)
        for group in self._gates.values():
            for gate in group:
                gate.set_watermark(END_OF_TIME)
                await gate.close()
        self._finished_at = time.monotonic()
        assert self._finished is not None
        self._finished.set()

    async def _apply(self, message: ChannelMessage) -> None:
        batch = message.batch
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
        if message.eof:
            self._eof[message.channel] = True
            advanced = self._watermarks_in.update(message.channel, END_OF_TIME)
            if advanced is not None and advanced < END_OF_TIME:
                await self._advance_watermark(advanced)
            if all(self._eof):
                await self._end_of_input()

    async def push(self, message: ChannelMessage) -> bool:
        """Apply one channel message (in sequence order); ``False`` if this subtask failed."""
        assert self._lock is not None
        if self._failure is not None:
            return False
        if self._started_at is None:
            self._started_at = time.monotonic()
        async with self._lock:
            if self._failure is not None:
                return False
            try:
                for ready in self._receivers[message.channel].accept(message):
                    await self._apply(ready)
            except BaseException as error:  # noqa: BLE001 - recorded, reported by done()
                self._fail(error, stage=None)
                return False
        return True

    async def run(self) -> None:
        """Read the source until it ends (or ``stop``), pushing batches through the chain."""
        assert self._reader is not None and self._lock is not None
        self._started_at = time.monotonic()
        reader = self._reader
        try:
            while not self._stop_requested:
                async with self._lock:
                    if self._failure is not None:
                        break
                    item = reader.read()
                    if item is None:
                        break
                    if isinstance(item, Idle):
                        pass
                    else:
                        await self._route(0, [(MAIN, item)])
                        if self._watermarks_out is not None:
                            watermark = self._watermarks_out.on_batch(item)
                            if watermark is not None:
                                await self._advance_watermark(watermark)
                if isinstance(item, Idle):
                    await asyncio.sleep(item.seconds)
                else:
                    await asyncio.sleep(0)
            if self._failure is None:
                async with self._lock:
                    await self._end_of_input()
        except BaseException as error:  # noqa: BLE001 - recorded, reported by done()
            self._fail(error, stage=0)
        finally:
            reader.close()

    def stop(self) -> None:
        """Ask a source to end its input now (a graceful, draining stop)."""
        self._stop_requested = True

    async def done(self) -> None:
        """Return when this subtask processed its end of input; raise its failure if it failed."""
        assert self._finished is not None
        await self._finished.wait()
        if self._linger_task is not None:
            self._linger_task.cancel()
        if self._failure is not None:
            raise self._failure

    # -- two-phase commit -----------------------------------------------------------

    async def commit(self) -> int:
        """Commit what the sink pre-committed at the end of input; return the committables count."""
        return await asyncio.to_thread(self._commit)

    def _commit(self) -> int:
        if self._sink is None:
            return 0
        ctx = SinkContext(self._plan.job, self._vertex.nodes[-1].name, self._subtask, self._vertex.parallelism)
        self._sink_spec.create_committer(ctx).commit(self._sink.committables)
        return len(self._sink.committables)

    async def abort(self) -> None:
        """Discard everything this subtask's sink wrote or pre-committed."""
        await asyncio.to_thread(self._abort)

    def _abort(self) -> None:
        if self._sink is None:
            return
        with contextlib.suppress(Exception):
            self._sink.writer.abort()
        ctx = SinkContext(self._plan.job, self._vertex.nodes[-1].name, self._subtask, self._vertex.parallelism)
        self._sink_spec.create_committer(ctx).abort(self._sink.committables)

    # -- observation ----------------------------------------------------------------

    def metrics(self) -> dict[str, Any]:
        """Counters of this subtask, per chained operator."""
        operators = {}
        for stage, node in enumerate(self._vertex.nodes):
            logic = self._stages[stage]
            extra = logic.metrics() if logic is not None else {}
            operators[node.name] = {"records_in": self._records_in[stage], "records_out": self._records_out[stage],
                                    **extra}
        gates = [gate for group in self._gates.values() for gate in group]
        busy = None
        if self._started_at is not None:
            busy = (self._finished_at or time.monotonic()) - self._started_at
        return {
            "actor": self._label,
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
            "finished": self._finished is not None and self._finished.is_set() and self._failure is None,
        }

    def source_offset(self) -> Any:
        """The source reader's current offset (what a checkpoint will record)."""
        return self._reader.offset() if self._reader is not None else None
