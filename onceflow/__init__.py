"""onceflow: exactly-once stream processing on Ray with Arrow micro-batches.

This module is the public API only: it re-exports names from
:mod:`onceflow.runtime`, :mod:`onceflow.operators` and :mod:`onceflow.checkpoint`
and holds no logic.

Example:
    >>> import onceflow as of
    >>> flow = of.Dataflow("features")
    >>> isinstance(flow, of.Dataflow)
    True

"""

from onceflow import agg, sinks, sources, windows
from onceflow.checkpoint.config import CheckpointConfig
from onceflow.checkpoint.supervisor import JobPhase
from onceflow.errors import (
    CheckpointError,
    DataError,
    JobFailedError,
    OnceflowError,
    OperatorError,
    PlanError,
    SinkCommitError,
)
from onceflow.operators.watermark import BoundedOutOfOrderness
from onceflow.runtime.dataflow import Dataflow, KeyedStream, Stream, WindowedStream
from onceflow.runtime.job import JobHandle, JobResult, JobStatus, run, submit
from onceflow.runtime.options import JobOptions
from onceflow.runtime.restart import RestartStrategy
from onceflow.runtime.warm import prestart

__all__ = [
    "BoundedOutOfOrderness",
    "CheckpointConfig",
    "CheckpointError",
    "DataError",
    "Dataflow",
    "JobFailedError",
    "JobHandle",
    "JobOptions",
    "JobPhase",
    "JobResult",
    "JobStatus",
    "KeyedStream",
    "OnceflowError",
    "OperatorError",
    "PlanError",
    "RestartStrategy",
    "SinkCommitError",
    "Stream",
    "WindowedStream",
    "agg",
    "prestart",
    "run",
    "sinks",
    "sources",
    "submit",
    "windows",
]
