"""Sources: replayable inputs that record their offsets."""

from operators.sources.base import Idle, Source, SourceContext, SourceReader
from operators.sources.generator import GeneratorSource
from operators.sources.jsonl import JsonLinesSource
from operators.sources.parquet import ParquetSource
from operators.sources.testing import TestingSource

__all__ = [
    "GeneratorSource",
    "Idle",
    "JsonLinesSource",
    "ParquetSource",
    "Source",
    "SourceContext",
    "SourceReader",
    "TestingSource",
]
