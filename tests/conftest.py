"""Shared fixtures: one embedded Ray per test session, started in a fresh temp dir."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest
import ray

from onceflow.runtime.warm import embedded_system_config
from tests.kafka_server import KafkaServer
from tests.postgres_server import PostgresServer
from tests.s3_server import S3Server


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """An embedded local Ray for the whole session, its workers preloading onceflow as ``of.run``'s would.

    A fresh temp dir avoids stale cluster files.
    """
    if ray.is_initialized():
        yield
        return
    temp_dir = tempfile.mkdtemp(prefix="ray-of-")
    ray.init(address="local", include_dashboard=False, num_cpus=max(os.cpu_count() or 2, 2),
             _temp_dir=temp_dir, logging_level="WARNING", namespace="onceflow-tests",
             _system_config=embedded_system_config())
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server on loopback with two-phase commit enabled, for the whole session."""
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def kafka() -> Iterator[KafkaServer]:
    """A Kafka-protocol broker on loopback (noida-db), for the whole session."""
    server = KafkaServer().start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """An S3-compatible server (moto) on loopback with one bucket, for the whole session."""
    pytest.importorskip("moto.server", reason="moto is not installed: pip install -e '.[test]' installs it")
    server = S3Server().start()
    try:
        yield server
    finally:
        server.destroy()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``slow`` tests unless ONCEFLOW_SLOW=1 (CI runs a representative subset)."""
    if os.environ.get("ONCEFLOW_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set ONCEFLOW_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
