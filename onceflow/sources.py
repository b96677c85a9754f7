"""Sources: replayable inputs that record their offsets."""

from onceflow.operators.sources.base import Idle, PerSplitWatermarks, Source, SourceContext, SourceReader
from onceflow.operators.sources.generator import GeneratorSource
from onceflow.operators.sources.jsonl import JsonLinesSource
from onceflow.operators.sources.kafka import KafkaSource
from onceflow.operators.sources.parquet import ParquetSource
from onceflow.testing.source import TestingSource

__all__ = [
    "GeneratorSource",
    "Idle",
    "JsonLinesSource",
    "KafkaSource",
    "ParquetSource",
    "PerSplitWatermarks",
    "Source",
    "SourceContext",
    "SourceReader",
    "TestingSource",
]
