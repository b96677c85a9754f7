"""Sinks: two-phase-commit outputs."""

from checkpoint.two_phase_commit import Committer, SinkContext, SinkWriter, TransactionalSink
from operators.sinks.parquet import ParquetSink
from operators.sinks.postgres import PostgresSink
from operators.sinks.testing import TestingSink

__all__ = ["Committer", "ParquetSink", "PostgresSink", "SinkContext", "SinkWriter", "TestingSink", "TransactionalSink"]
