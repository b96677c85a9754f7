"""Where a job's actors run: on Ray (:class:`RayExecutor`), or in this process (:class:`LocalExecutor`).

The job's driver (:class:`~onceflow.runtime.job.JobHandle`) creates its
subtask and coordinator actors, calls them, waits on the calls, kills and
fences them through an executor; everything it runs (the subtasks' input
gates, operator chains and sink committers, the checkpoint coordinator, the
supervisor's decisions) is the same on both.

- :class:`RayExecutor`: named async Ray actors in the ``onceflow`` namespace,
  one process each, on an embedded Ray or a cluster. The default.
- :class:`LocalExecutor` (``of.run(flow, executor="local")``): every actor is
  a plain object on one asyncio event loop, in a background thread of this
  process; a call returns a future instead of an object reference. Nothing
  starts Ray, so a pipeline test runs in milliseconds. Checkpoints, restarts
  and two-phase commit work as on Ray (checkpoints go to durable storage; there
  is no object store copy). What it cannot do: spread work over cores (one
  thread runs every operator; sink writes and storage I/O run in worker
  threads), or kill a thread inside a blocking call (a killed actor's pending
  calls fail at once, but a write already running in a worker thread
  finishes).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import inspect
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import ray
import ray.exceptions
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from onceflow.runtime.ray_env import NAMESPACE
from onceflow.runtime.warm import WARM_WORKERS
from onceflow.testing import failpoints

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Sequence

__all__ = ["Executor", "LocalActorDiedError", "LocalExecutor", "RayExecutor", "executor_named"]

log = logging.getLogger("onceflow")

class Executor(Protocol):
    """What the job's driver needs from the place its actors run."""

    object_store: bool
    """Whether snapshots can be cached in an object store beside their durable files."""

    def create(self, cls: type, name: str, options: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        """Create actor ``name`` running ``cls(*args, **kwargs)``; return its handle."""

    def running(self, prefix: str) -> list[str]:
        """The names of live actors that start with ``prefix``."""

    def nodes(self) -> tuple[dict[str, dict[str, float]], str]:
        """The alive nodes (id -> total resources), and the node this driver runs on (none, ``""``, without nodes)."""

    def on_node(self, node: str) -> dict[str, Any]:
        """Actor options that place an actor on node ``node`` (``{}`` for ``""``: anywhere)."""

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` as a task; return a reference to its result."""

    def wait(self, refs: Sequence[Any], num_returns: int, timeout: float | None) -> tuple[list[Any], list[Any]]:
        """Wait until ``num_returns`` of ``refs`` are ready or ``timeout`` passed: (ready, not ready)."""

    def get(self, refs: Any, timeout: float | None = None) -> Any:
        """The value of a reference (or a list of references); raises what the call raised."""

    def kill(self, actors: Sequence[Any]) -> None:
        """Kill ``actors`` (no restart); they may not be dead yet when this returns."""

    def confirm_dead(self, actors: Sequence[Any]) -> None:
        """Wait until every killed actor is known dead, so nothing of it can act any more."""

    def keep_warm(self, owner: str, per_node: dict[str, int], after_s: float) -> None:
        """Keep ``per_node[node]`` idle worker processes on each node while ``owner`` runs, from ``after_s`` on.

        See :mod:`onceflow.runtime.warm`.
        """

    def release_warm(self, owner: str) -> None:
        """``owner`` ended: stop topping up the warm processes it asked for."""

    @staticmethod
    def died(error: BaseException) -> bool:
        """Whether ``error`` says an actor died (rather than that a call failed)."""


class RayExecutor:
    """Actors as named async Ray actors in the ``onceflow`` namespace."""

    object_store = True
    _remote: ClassVar[dict[type, Any]] = {}

    def create(self, cls: type, name: str, options: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        remote_cls = self._remote.get(cls)
        if remote_cls is None:
            remote_cls = self._remote[cls] = ray.remote(cls)
        deadline = time.monotonic() + 15
        while True:
            try:
                return remote_cls.options(name=name, namespace=NAMESPACE, **options).remote(*args, **kwargs)
            except ValueError as error:
                # A killed actor's name is released asynchronously after its death.
                if time.monotonic() > deadline:
                    msg = f"an actor named {name!r} still exists in namespace {NAMESPACE!r} ({error})"
                    raise RuntimeError(msg) from error
                time.sleep(0.05)

    def running(self, prefix: str) -> list[str]:
        return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                      if a["namespace"] == NAMESPACE and a["name"].startswith(prefix))

    def nodes(self) -> tuple[dict[str, dict[str, float]], str]:
        alive = {n["NodeID"]: dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")}
        return alive, ray.get_runtime_context().get_node_id()

    def on_node(self, node: str) -> dict[str, Any]:
        if not node:
            return {}
        # A hard affinity: measured on Ray 2.60, a soft one put zero-CPU actors on another node than the one
        # asked for, every time. The node was alive when the attempt was planned; if it dies before the
        # actor starts, the deployment fails and the next attempt is planned on the nodes left.
        return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return ray.remote(num_cpus=0, max_retries=0)(fn).remote(*args)

    def wait(self, refs: Sequence[Any], num_returns: int, timeout: float | None) -> tuple[list[Any], list[Any]]:
        return ray.wait(list(refs), num_returns=num_returns, timeout=timeout)

    def get(self, refs: Any, timeout: float | None = None) -> Any:
        return ray.get(refs, timeout=timeout)

    def kill(self, actors: Sequence[Any]) -> None:
        for actor in actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)

    def confirm_dead(self, actors: Sequence[Any]) -> None:
        """Wait as long as it takes (warning every 30 s): a new attempt never starts beside a zombie of the old one."""
        pending = list(actors)
        waited = time.monotonic()
        while pending:
            refs: dict[Any, Any] = {a.__ray_ready__.remote(): a for a in pending}
            ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=1.0)
            alive = []
            for ref in ready:
                try:
                    ray.get(ref, timeout=0)
                    alive.append(refs[ref])  # it answered: the kill has not landed yet
                except Exception:  # noqa: BLE001, S110 - dead, as intended
                    pass
            pending = alive + [a for r, a in refs.items() if r not in ready]
            if alive:
                self.kill(alive)
                time.sleep(0.02)
            if pending and time.monotonic() - waited > 30:
                log.warning("%d killed actor(s) not yet confirmed dead; still waiting", len(pending))
                waited = time.monotonic()

    def keep_warm(self, owner: str, per_node: dict[str, int], after_s: float) -> None:
        WARM_WORKERS.keep(owner, per_node, after_s)

    def release_warm(self, owner: str) -> None:
        WARM_WORKERS.release(owner)

    @staticmethod
    def died(error: BaseException) -> bool:
        return isinstance(error, ray.exceptions.ActorDiedError | ray.exceptions.ActorUnavailableError)


class LocalActorDiedError(ray.exceptions.ActorDiedError):
    """A call on a local actor that was killed (an :class:`ray.exceptions.ActorDiedError`, as on Ray)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def __str__(self) -> str:
        return f"actor {self.name!r} was killed"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.name,))


_OWNER: contextvars.ContextVar[LocalActor | None] = contextvars.ContextVar("onceflow_local_actor", default=None)
"""The local actor whose code is running: every task it creates belongs to it (and dies with it)."""


class _LocalMethod:
    __slots__ = ("_actor", "_name")

    def __init__(self, actor: LocalActor, name: str) -> None:
        self._actor = actor
        self._name = name

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return self._actor.submit(self._name, args, kwargs)


class LocalActor:
    """A handle on an object that lives on the local executor's event loop; ``handle.method.remote(...)`` calls it.

    Called from the loop (one actor calling another), a call returns an
    :class:`asyncio.Task`; from any other thread, a
    :class:`concurrent.futures.Future`. Calls start in the order they were made.
    """

    def __init__(self, executor: LocalExecutor, name: str, instance: Any) -> None:
        self.name = name
        self._executor = executor
        self._instance = instance
        self.dead = False
        self.tasks: set[asyncio.Task[Any]] = set()

    def __getattr__(self, method: str) -> _LocalMethod:
        if method.startswith("__"):
            raise AttributeError(method)
        return _LocalMethod(self, method)

    def __repr__(self) -> str:
        return f"LocalActor({self.name!r})"

    def quiet_if_killed(self, task: asyncio.Task[Any]) -> None:
        """A task of this actor ended after its kill: nobody needs to hear how (as of a killed process's work).

        A live actor's task that fails unheard is still reported by asyncio.
        """
        if self.dead and not task.cancelled():
            task.exception()  # marks it as retrieved

    def submit(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        loop = self._executor.loop
        with contextlib.suppress(RuntimeError):
            if asyncio.get_running_loop() is loop:
                return loop.create_task(self._invoke(method, args, kwargs), context=self._context())
        return asyncio.run_coroutine_threadsafe(self._enter(method, args, kwargs), loop)

    def _context(self) -> contextvars.Context:
        context = contextvars.copy_context()
        context.run(_OWNER.set, self)
        context.run(failpoints.CRASH.set, self._crash)
        return context

    def _crash(self) -> None:
        """A crash point fired in this actor's code: the actor dies (not the process), at once."""
        self._executor.kill([self])
        raise LocalActorDiedError(self.name)

    async def _enter(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """From another thread: run the call as a task of this actor."""
        return await asyncio.get_running_loop().create_task(self._invoke(method, args, kwargs),
                                                           context=self._context())

    async def _invoke(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.dead:
            raise LocalActorDiedError(self.name)
        try:
            result = getattr(self._instance, method)(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
        except asyncio.CancelledError:
            if self.dead:
                raise LocalActorDiedError(self.name) from None
            raise
        return result


class LocalExecutor:
    """Actors as objects on one asyncio event loop in a background thread of this process (see the module)."""

    object_store = False
    _shared: ClassVar[LocalExecutor | None] = None
    _shared_lock = threading.Lock()
    """Guards ``_shared``: the first local job of the process makes the executor, once."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.set_task_factory(self._task_factory)  # type: ignore[arg-type]  # 3.11 passes context= too
        self._actors: dict[str, LocalActor | None] = {}  # None: being built
        self._names = threading.Lock()
        """Guards ``_actors`` between the drivers of the jobs that share this executor."""
        self._threads = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="onceflow-local-task")
        thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="onceflow-local")
        thread.start()

    @classmethod
    def shared(cls) -> LocalExecutor:
        """The executor every local job of this process shares (one event loop, one set of actor names)."""
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    @staticmethod
    def _task_factory(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any],
                      context: contextvars.Context | None = None) -> asyncio.Task[Any]:
        task = asyncio.Task(coro, loop=loop, context=context)
        owner = (context or contextvars.copy_context()).get(_OWNER)
        if owner is not None:
            owner.tasks.add(task)
            task.add_done_callback(owner.tasks.discard)
            task.add_done_callback(owner.quiet_if_killed)
        return task

    def create(self, cls: type, name: str, options: dict[str, Any], *args: Any, **kwargs: Any) -> LocalActor:
        with self._names:
            if name in self._actors:
                msg = f"a local actor named {name!r} already exists"
                raise RuntimeError(msg)
            self._actors[name] = None  # the name is taken while the instance is built
        try:
            actor = LocalActor(self, name, cls(*args, **kwargs))
        except BaseException:
            with self._names:
                del self._actors[name]
            raise
        with self._names:
            self._actors[name] = actor
        return actor

    def running(self, prefix: str) -> list[str]:
        with self._names:
            return sorted(name for name in self._actors if name.startswith(prefix))

    def nodes(self) -> tuple[dict[str, dict[str, float]], str]:
        return {}, ""

    def on_node(self, node: str) -> dict[str, Any]:
        return {}

    def call(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        return self._threads.submit(fn, *args)

    def wait(self, refs: Sequence[Any], num_returns: int, timeout: float | None) -> tuple[list[Any], list[Any]]:
        refs = list(refs)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            ready = [r for r in refs if r.done()]
            left = None if deadline is None else deadline - time.monotonic()
            if len(ready) >= num_returns or (left is not None and left <= 0):
                chosen = ready[:num_returns]
                return chosen, [r for r in refs if r not in chosen]
            concurrent.futures.wait([r for r in refs if not r.done()], timeout=left,
                                    return_when=concurrent.futures.FIRST_COMPLETED)

    def get(self, refs: Any, timeout: float | None = None) -> Any:
        if isinstance(refs, list):
            deadline = None if timeout is None else time.monotonic() + timeout
            return [self.get(r, None if deadline is None else max(deadline - time.monotonic(), 0)) for r in refs]
        try:
            return refs.result(timeout)
        except concurrent.futures.TimeoutError as error:
            raise TimeoutError(str(error) or "the call did not return in time") from error

    def kill(self, actors: Sequence[Any]) -> None:
        with self._names:
            for actor in actors:
                actor.dead = True
                self._actors.pop(actor.name, None)

        def cancel() -> None:
            for actor in actors:
                for task in list(actor.tasks):
                    task.cancel()

        self.loop.call_soon_threadsafe(cancel)

    def confirm_dead(self, actors: Sequence[Any]) -> None:
        async def settled() -> None:
            while any(actor.tasks for actor in actors):
                for actor in actors:
                    for task in list(actor.tasks):
                        task.cancel()
                await asyncio.gather(*(t for a in actors for t in list(a.tasks)), return_exceptions=True)

        asyncio.run_coroutine_threadsafe(settled(), self.loop).result()

    def keep_warm(self, owner: str, per_node: dict[str, int], after_s: float) -> None:
        """Nothing to keep: local actors start no process."""

    def release_warm(self, owner: str) -> None:
        """Nothing was kept."""

    @staticmethod
    def died(error: BaseException) -> bool:
        return RayExecutor.died(error)


def executor_named(name: str) -> Executor:
    """The executor ``JobOptions.executor`` names."""
    if name == "local":
        return LocalExecutor.shared()
    return RayExecutor()
