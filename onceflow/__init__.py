"""onceflow: exactly-once stream processing on Ray with Arrow micro-batches.

This package is the public API only; it re-exports names from ``runtime``,
``operators`` and ``checkpoint`` and holds no logic.

Example:
    >>> import onceflow as of
    >>> flow = of.Dataflow("features")
    >>> isinstance(flow, of.Dataflow)
    True

"""

from checkpoint.config import CheckpointConfig, RestartStrategy
from checkpoint.errors import (
    CheckpointError,
    DataError,
    JobFailedError,
    OnceflowError,
    OperatorError,
    PlanError,
    SinkCommitError,
)
from checkpoint.supervisor import JobPhase
from onceflow import agg, sinks, sources, windows
from operators.watermark import BoundedOutOfOrderness
from runtime.dataflow import Dataflow, KeyedStream, Stream, WindowedStream
from runtime.job import JobHandle, JobResult, JobStatus, run, submit

__all__ = [
    "BoundedOutOfOrderness",
    "CheckpointConfig",
    "CheckpointError",
    "DataError",
    "Dataflow",
    "JobFailedError",
    "JobHandle",
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
    "run",
    "sinks",
    "sources",
    "submit",
    "windows",
]
