"""Sinks: two-phase-commit outputs."""

from checkpoint.two_phase_commit import Committer, SinkContext, SinkWriter, TransactionalSink
from operators.sinks.parquet import ParquetSink
from operators.sinks.testing import TestingSink

__all__ = ["Committer", "ParquetSink", "SinkContext", "SinkWriter", "TestingSink", "TransactionalSink"]
