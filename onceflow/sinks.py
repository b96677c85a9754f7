"""Sinks: two-phase-commit outputs."""

from onceflow.checkpoint.two_phase_commit import (
    Committable,
    CommittableRecord,
    Committer,
    SinkContext,
    SinkWriter,
    TransactionalSink,
)
from onceflow.operators.sinks.kafka import KafkaSink
from onceflow.operators.sinks.parquet import ParquetSink
from onceflow.operators.sinks.postgres import PostgresSink
from onceflow.testing.sink import TestingSink

__all__ = [
    "Committable",
    "CommittableRecord",
    "Committer",
    "KafkaSink",
    "ParquetSink",
    "PostgresSink",
    "SinkContext",
    "SinkWriter",
    "TestingSink",
    "TransactionalSink",
]
