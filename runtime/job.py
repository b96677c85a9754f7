"""Running a dataflow: create the subtask actors, wire them, supervise, commit.

``run`` blocks until a bounded job has finished and returns its
:class:`JobResult`; ``submit`` starts the job and returns a :class:`JobHandle`.
When every sink subtask has pre-committed at the end of input, the job commits
them all; if anything fails first, every sink aborts, so a failed job leaves no
visible output (checkpointed jobs commit per checkpoint instead).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

import ray

from checkpoint.errors import JobFailedError, OnceflowError, PlanError
from operators.keygroups import DEFAULT_MAX_PARALLELISM
from runtime.actor import RuntimeOptions, SubtaskActor
from runtime.dataflow import NodeKind
from runtime.output import DownstreamFailedError
from runtime.plan import PhysicalPlan, plan
from runtime.ray_env import NAMESPACE, ensure_ray

if TYPE_CHECKING:
    from ray.actor import ActorHandle

    from runtime.dataflow import Dataflow

__all__ = ["JobHandle", "JobResult", "JobStatus", "run", "submit"]

log = logging.getLogger("onceflow")


class JobStatus(Enum):
    """Where a job is in its life."""

    RUNNING = "RUNNING"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


@dataclass(slots=True)
class JobResult:
    """What a finished job reports.

    Attributes:
        job: the job name.
        metrics: ``events_in``, ``events_out``, ``checkpoints_completed``,
            ``restarts``, ``duration_s`` (first read to last commit),
            ``startup_s`` (actors created and wired), ``events_per_s``,
            ``late_events``, ``backpressure_s`` and ``operators`` (per operator:
            ``records_in``, ``records_out`` and operator counters summed over subtasks).
        plan: the physical plan, one line per vertex.

    """

    job: str
    metrics: dict[str, Any] = field(default_factory=dict)
    plan: str = ""


def _sum_metrics(per_actor: list[dict[str, Any]], plan_: PhysicalPlan) -> dict[str, Any]:
    operators: dict[str, dict[str, Any]] = {}
    for entry in per_actor:
        for name, counters in entry["operators"].items():
            total = operators.setdefault(name, {"subtasks": 0})
            total["subtasks"] += 1
            for key, value in counters.items():
                if isinstance(value, int | float):
                    total[key] = total.get(key, 0) + value
    source_names = {n.name for v in plan_.vertices for n in v.nodes if n.kind is NodeKind.SOURCE}
    return {
        "events_in": sum(operators[n]["records_out"] for n in source_names if n in operators),
        "events_out": sum(e["sink_rows"] for e in per_actor),
        "late_events": sum(c.get("late_events", 0) for c in operators.values()),
        "backpressure_s": sum(e["backpressure_s"] for e in per_actor),
        "messages": sum(e["messages_out"] for e in per_actor),
        "operators": operators,
        "subtasks": {e["actor"]: {k: e[k] for k in ("backpressure_s", "messages_out", "active_s")} for e in per_actor},
    }


class JobHandle:
    """A running job: watch it, wait for it, stop or cancel it."""

    def __init__(self, flow: Dataflow, plan_: PhysicalPlan, actors: dict[int, list[ActorHandle]],
                 started_ray: bool, created_at: float) -> None:
        self.job = flow.name
        self._flow = flow
        self._plan = plan_
        self._actors = actors
        self._started_ray = started_ray
        self._created_at = created_at
        self._status = JobStatus.RUNNING
        self._result: JobResult | None = None
        self._error: BaseException | None = None
        everyone = [a for group in actors.values() for a in group]
        self._all = everyone
        self._sources = [a for v in plan_.vertices if v.is_source for a in actors[v.id]]
        self._sinks = [a for v in plan_.vertices if v.nodes[-1].kind is NodeKind.SINK for a in actors[v.id]]
        ray.get([a.connect.remote({v.id: actors[v.id] for v in plan_.vertices}) for a in everyone])
        self.startup_s = time.monotonic() - created_at
        self._started = time.monotonic()
        names = [f"{self.job}/{v.name}/{i}" for v in plan_.vertices for i in range(v.parallelism)]
        self._pending: dict[Any, str] = {a.done.remote(): name for a, name in zip(everyone, names, strict=True)}
        self._runs = [a.run.remote() for a in self._sources]

    @property
    def actor_names(self) -> list[str]:
        """The named subtask actors of this job (``<job>/<operator>/<subtask>``)."""
        return [f"{self.job}/{v.name}/{i}" for v in self._plan.vertices for i in range(v.parallelism)]

    def status(self) -> JobStatus:
        """The job's status, without waiting."""
        if self._status is JobStatus.RUNNING:
            ready, _ = ray.wait(list(self._pending), num_returns=len(self._pending), timeout=0)
            if len(ready) == len(self._pending):
                self.wait()
        return self._status

    def metrics(self, timeout_s: float = 10.0) -> dict[str, Any]:
        """Live counters summed over subtasks (as :attr:`JobResult.metrics`)."""
        if self._result is not None:
            return self._result.metrics
        per_actor: list[dict[str, Any]] = ray.get([a.metrics.remote() for a in self._all], timeout=timeout_s)
        return _sum_metrics(per_actor, self._plan)

    def stop(self, timeout_s: float | None = None) -> JobResult:
        """End the input of every source now, let the job drain and commit, and return its result."""
        if self._status is JobStatus.RUNNING:
            ray.get([a.stop.remote() for a in self._sources])
        return self.wait(timeout_s)

    def cancel(self) -> None:
        """Stop at once; everything not yet committed is discarded."""
        if self._status is JobStatus.RUNNING:
            self._abort_and_kill()
            self._status = JobStatus.CANCELLED

    def wait(self, timeout_s: float | None = None) -> JobResult:
        """Block until the job finishes; return its result.

        Raises:
            JobFailedError: an operator failed; nothing of this job was committed.
            TimeoutError: ``timeout_s`` passed first (the job keeps running).

        """
        if self._result is not None:
            return self._result
        if self._error is not None:
            raise self._error
        if self._status is JobStatus.CANCELLED:
            msg = f"job {self.job!r} was cancelled"
            raise JobFailedError(msg, job=self.job)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self._pending:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0)
            ready, _ = ray.wait(list(self._pending), num_returns=1, timeout=remaining)
            if not ready:
                msg = f"job {self.job!r} still running after {timeout_s} s"
                raise TimeoutError(msg)
            try:
                ray.get(ready[0])
            except Exception:  # noqa: BLE001 - turned into JobFailedError below
                self._fail()
                assert self._error is not None
                raise self._error from None
            del self._pending[ready[0]]
        ray.get(self._runs)
        processed = time.monotonic()
        per_actor: list[dict[str, Any]] = ray.get([a.metrics.remote() for a in self._all])
        try:
            ray.get([a.commit.remote() for a in self._sinks])
        except Exception as error:
            self._error = JobFailedError(f"job {self.job!r}: committing the output failed: {error}", job=self.job)
            self._status = JobStatus.FAILED
            self._kill()
            raise self._error from error
        finished = time.monotonic()
        metrics = _sum_metrics(per_actor, self._plan)
        duration = finished - self._started
        metrics.update(
            checkpoints_completed=0,
            restarts=0,
            duration_s=duration,
            processing_s=processed - self._started,
            startup_s=self.startup_s,
            events_per_s=metrics["events_in"] / duration if duration > 0 else 0.0,
        )
        self._result = JobResult(self.job, metrics, self._plan.describe())
        self._status = JobStatus.FINISHED
        self._kill()
        return self._result

    def _fail(self) -> None:
        """Find the root failure, abort every sink, kill the actors."""
        root: BaseException | None = None
        failed_actor = ""
        outcomes: dict[Any, BaseException] = {}
        ready, _ = ray.wait(list(self._pending), num_returns=len(self._pending), timeout=2.0)
        for ref in ready:
            try:
                ray.get(ref)
            except Exception as error:  # noqa: BLE001 - classified below
                outcomes[ref] = error
        for ref, outcome in outcomes.items():
            cause = getattr(outcome, "cause", None) or outcome
            if isinstance(cause, DownstreamFailedError):
                continue
            if root is None or (isinstance(cause, OnceflowError) and not isinstance(root, OnceflowError)):
                root = cause
                failed_actor = self._pending[ref]
        if root is None:
            root = next(iter(outcomes.values()), RuntimeError("unknown failure"))
        if isinstance(root, ray.exceptions.ActorDiedError | ray.exceptions.ActorUnavailableError):
            message = f"job {self.job!r} failed: subtask actor {failed_actor!r} died; nothing was committed"
        else:
            message = f"job {self.job!r} failed: {root}"
        self._error = JobFailedError(message, job=self.job, operator=getattr(root, "operator", failed_actor))
        self._error.__cause__ = root
        self._status = JobStatus.FAILED
        self._abort_and_kill()

    def _abort_and_kill(self) -> None:
        refs: list[Any] = [a.abort.remote() for a in self._sinks]
        with contextlib.suppress(Exception):
            ray.wait(refs, num_returns=len(refs), timeout=10)
        self._kill()

    def _kill(self) -> None:
        for actor in self._all:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        self._pending.clear()


def submit(flow: Dataflow, *, parallelism: int = 1, address: str | None = None,
           max_parallelism: int = DEFAULT_MAX_PARALLELISM, batch_bytes: int | None = None,
           linger_s: float | None = None, credits: int | None = None, chaining: bool = True,
           actor_options: dict[str, Any] | None = None) -> JobHandle:
    """Start ``flow`` and return a handle without waiting for it.

    Args:
        flow: the dataflow.
        parallelism: the default parallelism of sources, keyed operators and unions.
        address: ``None`` reuses an initialised Ray or starts an embedded one
            (or joins ``RAY_ADDRESS`` under ``ray job submit``); ``"auto"`` or
            ``"ray://..."`` joins a cluster.
        max_parallelism: the number of key groups (the most subtasks a keyed operator can have).
        batch_bytes: a channel sends once it buffers this many bytes.
        linger_s: a channel sends buffered rows at the latest after this long.
        credits: unacknowledged messages per channel.
        chaining: fuse forward-connected operators into one actor.
        actor_options: extra Ray actor options for every subtask (``num_cpus``, ...).

    Raises:
        PlanError: the dataflow cannot run (no sink, bad parallelism, a job of
            the same name is already running).

    """
    physical = plan(flow, parallelism, max_parallelism=max_parallelism, chaining=chaining)
    defaults = RuntimeOptions()
    options = RuntimeOptions(
        batch_bytes=batch_bytes or defaults.batch_bytes,
        linger_s=defaults.linger_s if linger_s is None else linger_s,
        credits=credits or defaults.credits,
    )
    started_ray = ensure_ray(address)
    created_at = time.monotonic()
    for node in flow.nodes:
        if node.kind is NodeKind.SINK:
            node.spec.prepare()
    remote_cls: Any = ray.remote(SubtaskActor)
    ray_options = {"num_cpus": 0, "max_restarts": 0, "max_concurrency": 1000, **(actor_options or {})}
    actors: dict[int, list[ActorHandle]] = {}
    created: list[ActorHandle] = []
    try:
        for vertex in physical.vertices:
            group = []
            for subtask in range(vertex.parallelism):
                name = f"{physical.job}/{vertex.name}/{subtask}"
                try:
                    actor = remote_cls.options(name=name, namespace=NAMESPACE, **ray_options).remote(
                        physical, vertex.id, subtask, options)
                except ValueError as error:
                    msg = (
                        f"cannot start job {physical.job!r}: an actor named {name!r} already exists "
                        f"in namespace {NAMESPACE!r} ({error}); stop that job or rename the dataflow"
                    )
                    raise PlanError(msg) from error
                created.append(actor)
                group.append(actor)
            actors[vertex.id] = group
        handle = JobHandle(flow, physical, actors, started_ray, created_at)
    except BaseException:
        for actor in created:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        raise
    log.info("job %s started: %d subtask actors\n%s", flow.name, len(created), physical.describe())
    return handle


def run(flow: Dataflow, *, parallelism: int = 1, address: str | None = None,
        max_parallelism: int = DEFAULT_MAX_PARALLELISM, batch_bytes: int | None = None,
        linger_s: float | None = None, credits: int | None = None, chaining: bool = True,
        actor_options: dict[str, Any] | None = None, timeout_s: float | None = None) -> JobResult:
    """Run a bounded ``flow`` to the end and return its result (see :func:`submit` for the arguments).

    Raises:
        JobFailedError: an operator failed; the message names it. Nothing of
            the job was committed.

    """
    handle = submit(flow, parallelism=parallelism, address=address, max_parallelism=max_parallelism,
                    batch_bytes=batch_bytes, linger_s=linger_s, credits=credits, chaining=chaining,
                    actor_options=actor_options)
    try:
        return handle.wait(timeout_s)
    except TimeoutError:
        handle.cancel()
        raise
