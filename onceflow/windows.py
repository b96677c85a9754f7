"""Event-time window assigners for ``KeyedStream.window``."""

from onceflow.operators.windows import Session, Sliding, Tumbling

__all__ = ["Session", "Sliding", "Tumbling"]
