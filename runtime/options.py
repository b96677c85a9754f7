"""Job options: everything ``of.run`` and ``of.submit`` take besides the dataflow, as one value.

A :class:`JobOptions` is frozen and validates itself on construction, so a bad
option fails before Ray starts, with a message naming the option and what to
do. ``of.run(flow, options=JobOptions(...))`` and the keyword form
``of.run(flow, parallelism=2, ...)`` are the same job: the keywords build a
:class:`JobOptions` (:meth:`JobOptions.from_keywords`); giving both is an error.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypedDict, Unpack

from onceflow.checkpoint.config import CheckpointConfig, require_int, require_number
from onceflow.errors import PlanError
from onceflow.operators.keygroups import DEFAULT_MAX_PARALLELISM
from onceflow.runtime.placement import Placement, check_placement
from onceflow.runtime.restart import RestartStrategy

__all__ = ["EXECUTORS", "JobKeywords", "JobOptions"]

EXECUTORS = ("ray", "local")
"""Where a job's actors can run: on Ray (the default), or in this process (see :mod:`onceflow.runtime.executor`)."""


class JobKeywords(TypedDict, total=False):
    """The keyword form of :class:`JobOptions`: ``of.run(flow, parallelism=2, ...)``, one keyword per field."""

    parallelism: int
    address: str | None
    checkpoint: CheckpointConfig | None
    restart: RestartStrategy | None
    max_parallelism: int
    batch_bytes: int | None
    linger_s: float | None
    credits: int | None
    chaining: bool
    actor_options: dict[str, Any] | None
    resume: bool
    from_savepoint: str | None
    allow_non_restored_state: bool
    executor: str
    placement: Placement
    restart_in_place: bool
    spare_workers: int


@dataclass(frozen=True, slots=True)
class JobOptions:
    """How to run a dataflow: parallelism, cluster, checkpointing, restarts, channel tuning.

    Attributes:
        parallelism: the default parallelism of sources, keyed operators and unions.
        address: ``None`` reuses an initialised Ray or starts an embedded one
            (or joins ``RAY_ADDRESS`` under ``ray job submit``); ``"auto"`` or
            ``"ray://..."`` joins a cluster.
        checkpoint: take checkpoints (exactly-once through failures); ``None``
            turns them off: a failure then fails the job and commits nothing.
        restart: how often and how soon to restart after a failure (with
            checkpointing); ``None`` means ``RestartStrategy.default()``
            (see :attr:`restart_strategy`).
        max_parallelism: the number of key groups (the most subtasks a keyed operator can have).
        batch_bytes: a channel sends once it buffers this many bytes (``None``: 4 MiB).
        linger_s: a channel sends buffered rows at the latest after this long (``None``: 50 ms).
        credits: unacknowledged messages per channel (``None``: 2).
        chaining: fuse forward-connected operators into one actor.
        actor_options: extra Ray actor options for every subtask (``num_cpus``, ...).
        resume: start from the newest complete checkpoint of this job in
            ``checkpoint.storage``, whichever run took it (after the driver
            itself was lost, or a job failed for good); without one the job
            starts from the beginning. A fresh run (``False``) never restores
            another run's state: it starts from the beginning, and its sinks
            abort every transaction an earlier run left uncommitted.
        from_savepoint: start from the savepoint at this location (what
            ``handle.savepoint()`` or ``handle.stop(savepoint=True)`` returned),
            at any parallelism: its state is imported into ``checkpoint.storage``
            as a checkpoint and restored (needs ``checkpoint``; not with ``resume``).
        allow_non_restored_state: when resuming, drop (with a warning)
            checkpointed state that matches no operator of the dataflow instead
            of refusing to start. State is matched by operator uid: an
            operator's ``name=``, or an id derived from the steps upstream of
            it, so give stateful operators names to keep their state across
            changes to the graph.
        executor: ``"ray"`` (the default) runs every subtask as a Ray actor;
            ``"local"`` runs the same subtasks, channels, checkpoints and
            commits in this process without Ray (for pipeline tests and
            notebooks: a job starts in milliseconds, on one core).
        placement: where the subtasks run on a Ray cluster, chosen again at
            every restart from the nodes then alive: ``"spread"`` (the
            default: round-robin over the nodes), ``"pack"`` (all on one
            node), or ``{operator name: node id or [node ids]}`` to pin the
            subtasks of those operators (the others are spread). Only alive
            nodes are chosen, so a restart after a node was lost places
            everything on the nodes left. The checkpoint coordinator
            goes to the node with the fewest subtasks (the driver's first
            among equals); see :mod:`onceflow.runtime.placement`. A
            ``scheduling_strategy`` in ``actor_options`` overrides it.
        restart_in_place: on a restart, fence the failed attempt inside the
            subtask actors that still answer and reset them for the next one
            (the same process restores the checkpoint), replacing only the
            actors that died, hang, or could not stop their work cleanly, as
            Flink redeploys into the TaskManagers left. ``False`` kills every
            actor and starts a new process for each subtask (slower: starting
            processes is most of a restart; see :mod:`onceflow.runtime.subtask_actor`).
        spare_workers: idle Ray worker processes the job keeps on each node it
            runs on, from 5 s after each deployment, so that an actor replaced
            after a failure starts in one instead of a new process (0.3 s
            instead of 0.75 s on 2 cores); see :mod:`onceflow.runtime.warm`.
            They belong to this driver and outlive the job for up to 5
            minutes, for the jobs that follow. 0 keeps none.

    Raises:
        PlanError: an option is out of range or of the wrong type, or
            ``resume=True`` without ``checkpoint``.

    Example:
        >>> options = JobOptions(parallelism=2, checkpoint=CheckpointConfig(interval_s=0.5))
        >>> options.parallelism, options.restart_strategy == RestartStrategy.default()
        (2, True)
        >>> options.replace(parallelism=4).parallelism
        4
        >>> JobOptions(parallelism=0)
        Traceback (most recent call last):
        ...
        onceflow.errors.PlanError: parallelism must be >= 1, got 0; pass parallelism=1 or more

    """

    parallelism: int = 1
    address: str | None = None
    checkpoint: CheckpointConfig | None = None
    restart: RestartStrategy | None = None
    max_parallelism: int = DEFAULT_MAX_PARALLELISM
    batch_bytes: int | None = None
    linger_s: float | None = None
    credits: int | None = None
    chaining: bool = True
    actor_options: dict[str, Any] | None = None
    resume: bool = False
    from_savepoint: str | None = None
    allow_non_restored_state: bool = False
    executor: str = "ray"
    placement: Placement = "spread"
    restart_in_place: bool = True
    spare_workers: int = 1

    def __post_init__(self) -> None:
        require_int("parallelism", self.parallelism, 1, hint="pass parallelism=1 or more")
        require_int(
            "max_parallelism",
            self.max_parallelism,
            1,
            hint="pass max_parallelism of at least the largest keyed parallelism (default 128)",
        )
        if self.address is not None and not isinstance(self.address, str):
            msg = f"address must be a string or None, got {self.address!r}; pass address='auto' or 'ray://host:port'"
            raise PlanError(msg)
        if self.checkpoint is not None and not isinstance(self.checkpoint, CheckpointConfig):
            msg = (
                f"checkpoint must be a CheckpointConfig or None, got {self.checkpoint!r}; "
                "pass checkpoint=of.CheckpointConfig(interval_s=..., storage=...)"
            )
            raise PlanError(msg)
        if self.restart is not None and not isinstance(self.restart, RestartStrategy):
            msg = (
                f"restart must be a RestartStrategy or None, got {self.restart!r}; "
                "pass restart=of.RestartStrategy.fixed_delay(attempts=3, delay_s=0.5)"
            )
            raise PlanError(msg)
        if self.batch_bytes is not None:
            require_int("batch_bytes", self.batch_bytes, 1, hint="pass batch_bytes=None for the default (4 MiB)")
        if self.linger_s is not None:
            require_number("linger_s", self.linger_s, positive=False, hint="pass linger_s=None for the default (50 ms)")
            if math.isinf(self.linger_s):
                msg = f"linger_s must be finite, got {self.linger_s}; pass linger_s=None for the default (50 ms)"
                raise PlanError(msg)
        require_int("spare_workers", self.spare_workers, 0, hint="pass spare_workers=0 to keep none")
        if self.credits is not None:
            require_int("credits", self.credits, 1, hint="pass credits=None for the default (2)")
        for name in ("chaining", "resume", "allow_non_restored_state", "restart_in_place"):
            if not isinstance(getattr(self, name), bool):
                msg = f"{name} must be True or False, got {getattr(self, name)!r}; pass {name}=True or {name}=False"
                raise PlanError(msg)
        if self.actor_options is not None:
            if not isinstance(self.actor_options, Mapping):
                msg = (
                    f"actor_options must be a dict of Ray actor options, got {self.actor_options!r}; "
                    "pass actor_options={'num_cpus': 1}"
                )
                raise PlanError(msg)
            object.__setattr__(self, "actor_options", dict(self.actor_options))
        if self.executor not in EXECUTORS:
            msg = (f"executor must be one of {', '.join(map(repr, EXECUTORS))}, got {self.executor!r}; pass "
                   "executor='local' to run in this process without Ray")
            raise PlanError(msg)
        object.__setattr__(self, "placement", check_placement(self.placement))
        if self.resume and self.checkpoint is None:
            msg = "resume=True needs checkpoint=CheckpointConfig(...) naming the storage to resume from"
            raise PlanError(msg)
        if self.from_savepoint is not None:
            if not isinstance(self.from_savepoint, str) or not self.from_savepoint:
                msg = (f"from_savepoint must be a savepoint's location, got {self.from_savepoint!r}; pass the path "
                       "handle.savepoint() returned")
                raise PlanError(msg)
            if self.checkpoint is None:
                msg = ("from_savepoint needs checkpoint=CheckpointConfig(...): the savepoint is restored as a "
                       "checkpoint of the job, and the job goes on taking checkpoints")
                raise PlanError(msg)
            if self.resume:
                msg = ("pass either resume=True (the newest checkpoint in the storage) or from_savepoint=... "
                       "(that savepoint), not both")
                raise PlanError(msg)

    @property
    def restart_strategy(self) -> RestartStrategy:
        """The restart strategy that applies: :attr:`restart`, or ``RestartStrategy.default()`` when it is ``None``."""
        return self.restart if self.restart is not None else RestartStrategy.default()

    def replace(self, **changes: Unpack[JobKeywords]) -> JobOptions:
        """A copy with ``changes`` applied (validated again).

        Raises:
            PlanError: a changed option is out of range.
            TypeError: a change names no option.

        """
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_keywords(cls, options: JobOptions | None, keywords: JobKeywords) -> JobOptions:
        """The options of a ``run``/``submit`` call: ``options``, or the ``keywords``, but not both.

        Args:
            options: the ``options=`` argument, or ``None``.
            keywords: the keyword options given (only those the caller passed).

        Raises:
            PlanError: both ``options`` and keywords were given, or an option is invalid.
            TypeError: a keyword names no option.

        Example:
            >>> JobOptions.from_keywords(None, {"parallelism": 3}).parallelism
            3
            >>> JobOptions.from_keywords(JobOptions(), {"parallelism": 3})
            Traceback (most recent call last):
            ...
            onceflow.errors.PlanError: pass either options=JobOptions(...) or keyword options (parallelism), ...

        """
        if options is None:
            return cls(**keywords)
        if not isinstance(options, JobOptions):
            msg = f"options must be a JobOptions, got {options!r}; pass options=of.JobOptions(parallelism=..., ...)"
            raise PlanError(msg)
        if keywords:
            names = ", ".join(sorted(keywords))
            first = sorted(keywords)[0]
            msg = (
                f"pass either options=JobOptions(...) or keyword options ({names}), not both; "
                f"move them into the JobOptions, e.g. options.replace({first}=...)"
            )
            raise PlanError(msg)
        return options
