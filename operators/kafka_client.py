"""What the Kafka source and sink share: importing confluent-kafka, and producing under a full queue.

confluent-kafka is an optional dependency (``pip install 'onceflow[kafka]'``),
imported only where a source or sink talks to a broker.
"""

from __future__ import annotations

from typing import Any

from onceflow.errors import PlanError

__all__ = ["confluent_kafka", "produce_waiting"]


def confluent_kafka(what: str) -> Any:
    """Import confluent_kafka, or raise a :class:`PlanError` saying that ``what`` needs the kafka extra.

    Args:
        what: the source or sink asking, for the message (``"kafka source 'clicks'"``).
    """
    try:
        import confluent_kafka as module
    except ImportError as error:
        msg = f"{what}: confluent-kafka is not installed; pip install 'onceflow[kafka]'"
        raise PlanError(msg) from error
    return module


def produce_waiting(producer: Any, topic: str, value: bytes, **options: Any) -> None:
    """``producer.produce(topic, value, **options)``, serving delivery reports while its queue is full."""
    while True:
        try:
            producer.produce(topic, value, **options)
            return
        except BufferError:
            producer.poll(0.05)
