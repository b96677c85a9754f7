"""Event-time window assigners for ``KeyedStream.window``."""

from operators.windows import Session, Sliding, Tumbling

__all__ = ["Session", "Sliding", "Tumbling"]
