"""What tests of onceflow, and tests of users' dataflows, need.

- :class:`TestingSource` (:mod:`onceflow.testing.source`): an in-memory,
  replayable source of rows or Arrow batches with in-band markers
  (``TestingSource.ABORT()`` crashes the job once there, ``TestingSource.EOF()``
  ends a subtask's input).
- :class:`TestingSink` (:mod:`onceflow.testing.sink`): a two-phase-commit sink
  whose committed rows the driver reads back.
- :mod:`onceflow.testing.failpoints`: one-shot crash and pause points that
  the runtime and the sinks pass through, armed from a test.
- :mod:`onceflow.testing.workload`: the deterministic feature-window events
  of the demo and the benchmarks, and their reference result.

``of.sources.TestingSource`` and ``of.sinks.TestingSink`` are the same classes.

Example:
    >>> import onceflow as of
    >>> from onceflow.testing import TestingSink, TestingSource
    >>> of.sources.TestingSource is TestingSource and of.sinks.TestingSink is TestingSink
    True

"""

from onceflow.testing import failpoints, workload
from onceflow.testing.sink import TestingSink
from onceflow.testing.source import TestingSource, TestingSourceAbort
from onceflow.testing.workload import feature_events, feature_window_reference

__all__ = [
    "TestingSink",
    "TestingSource",
    "TestingSourceAbort",
    "failpoints",
    "feature_events",
    "feature_window_reference",
    "workload",
]
