"""Aggregations for ``WindowedStream.aggregate``."""

from onceflow.operators.agg import count, max, mean, min, sum  # noqa: A004 - the names users expect

__all__ = ["count", "max", "mean", "min", "sum"]
