"""examples/kafka_features.py end to end: Kafka → windows → a PostgreSQL upsert table, on Ray."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

import onceflow as of
from tests.kafka_server import KafkaServer
from tests.postgres_server import PostgresServer

EVENTS = 30_000


def example() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "examples" / "kafka_features.py"
    spec = importlib.util.spec_from_file_location("kafka_features", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pickled functions refer to it by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.usefixtures("ray_session")
def test_the_feature_table_equals_the_reference(kafka: KafkaServer, postgres: PostgresServer, tmp_path: Path) -> None:
    features = example()
    topic = f"features-{time.monotonic_ns()}"
    features.produce(kafka.bootstrap_servers, topic, EVENTS, partitions=4)
    table = f"features_{time.monotonic_ns()}"
    result = of.run(features.build(kafka.bootstrap_servers, topic, postgres.dsn, table, batch_size=2_000),
                    parallelism=2, checkpoint=of.CheckpointConfig(interval_s=0.2, storage=str(tmp_path)))
    assert result.metrics["events_in"] == EVENTS
    assert result.metrics["checkpoints_completed"] >= 1
    found = features.read_table(postgres.dsn, table)
    assert sum(found["count"].to_pylist()) == EVENTS
    assert features.matches_reference(found, EVENTS)


@pytest.mark.usefixtures("ray_session")
def test_the_features_published_to_kafka_equal_the_reference(kafka: KafkaServer, tmp_path: Path) -> None:
    features = example()
    topic, output = f"features-in-{time.monotonic_ns()}", f"features-out-{time.monotonic_ns()}"
    features.produce(kafka.bootstrap_servers, topic, EVENTS, partitions=4)
    kafka.create_topic(output, 3)
    result = of.run(features.build(kafka.bootstrap_servers, topic, None, output_topic=output, batch_size=2_000),
                    parallelism=2, checkpoint=of.CheckpointConfig(interval_s=0.2, storage=str(tmp_path)))
    assert result.metrics["events_in"] == EVENTS
    found = features.read_topic(kafka.bootstrap_servers, output)
    assert sum(found["count"].to_pylist()) == EVENTS
    assert features.matches_reference(found, EVENTS)
