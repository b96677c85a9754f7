"""A real Kafka-protocol broker on loopback for the tests, started and stopped by them.

Apache Kafka cannot be installed on these machines (no JVM package registry);
the ``noida-db`` package (PyPI: one native binary) serves the Kafka protocol,
transactions, ``read_committed``, producer fencing and
``send_offsets_to_transaction`` included. Its limits, which the tests must not
lean on: one node without replication; it never aborts a transaction on
``transaction.timeout.ms`` by itself; and a ``read_committed`` fetch that
starts after an aborted transaction is still told about it, so librdkafka
drops every later record of that producer id (Apache Kafka reports only
aborted transactions reaching into the fetched range): read a topic that has
aborted transactions from its start. Clients are the real librdkafka
(confluent-kafka).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.helpers import stop_process_group

__all__ = ["KafkaServer", "create_topic", "noida_db", "open_transactions", "read_messages", "topic_exists"]


def noida_db() -> Path:
    """The ``noida-db`` executable of this environment (the ``test`` extra installs it)."""
    found = Path(sys.executable).parent / "noida-db"
    if found.exists():
        return found
    which = shutil.which("noida-db")
    if which is None:
        with contextlib.suppress(ImportError):
            import noida_db as package  # the wheel ships the binary beside its module

            bundled = Path(package.__file__).parent / "noida-db"
            if bundled.exists():
                return bundled
        msg = "noida-db was not found; install the test extra (pip install -e '.[test]')"
        raise RuntimeError(msg)
    return Path(which)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class KafkaServer:
    """One throw-away broker: ``start()`` runs it in the foreground of a child process until ``destroy()``."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="onceflow-kafka-"))
        self.port = _free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        """The ``bootstrap.servers`` of the broker."""
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> KafkaServer:
        """Start the broker and wait until it answers a metadata request."""
        from confluent_kafka.admin import AdminClient

        log = (self.root / "server.log").open("wb")
        self._process = subprocess.Popen(
            [str(noida_db()), "start", "--only", "kafka", "--data-dir", str(self.root / "data"),
             "--kafka-port", str(self.port)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        admin = AdminClient({"bootstrap.servers": self.bootstrap_servers})
        while True:
            if self._process.poll() is not None:
                msg = f"the Kafka broker exited at start: {(self.root / 'server.log').read_text()[-2000:]}"
                raise RuntimeError(msg)
            with contextlib.suppress(Exception):
                if admin.list_topics(timeout=1).brokers:
                    return self
            if time.monotonic() > deadline:
                msg = f"the Kafka broker did not answer within {timeout_s} s"
                raise RuntimeError(msg)
            time.sleep(0.1)

    def create_topic(self, topic: str, partitions: int = 2) -> None:
        """Create ``topic`` with ``partitions`` partitions and wait until it exists."""
        create_topic(self.bootstrap_servers, topic, partitions)

    def topics(self) -> set[str]:
        """The names of the broker's topics."""
        from confluent_kafka.admin import AdminClient

        return set(AdminClient({"bootstrap.servers": self.bootstrap_servers}).list_topics(timeout=10).topics)

    def read(self, topic: str, isolation: str = "read_committed") -> list[Any]:
        """Every message of ``topic`` (see :func:`read_messages`)."""
        return read_messages(self.bootstrap_servers, topic, isolation)

    def open_transactions(self, topic: str) -> list[int]:
        """The partitions of ``topic`` an open transaction holds back (see :func:`open_transactions`)."""
        return open_transactions(self.bootstrap_servers, topic)

    def destroy(self, timeout_s: float = 20.0) -> None:
        """Stop the broker and delete its files.

        ``noida-db`` runs the broker in a child process of the one started
        here, so the whole process group (its own session) is signalled, and
        this returns once no member is left: the port is closed.
        """
        if self._process is not None:
            stop_process_group(self._process, timeout_s)
        shutil.rmtree(self.root, ignore_errors=True)


def create_topic(bootstrap_servers: str, topic: str, partitions: int) -> None:
    """Create ``topic`` with ``partitions`` partitions and wait until it exists."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    for future in admin.create_topics([NewTopic(topic, num_partitions=partitions)]).values():
        future.result(timeout=30)


def topic_exists(bootstrap_servers: str, topic: str) -> bool:
    """Whether the broker knows ``topic``."""
    from confluent_kafka.admin import AdminClient

    return topic in AdminClient({"bootstrap.servers": bootstrap_servers}).list_topics(timeout=30).topics


def read_messages(bootstrap_servers: str, topic: str, isolation: str = "read_committed",
                  timeout_s: float = 30.0) -> list[Any]:
    """Every message of ``topic`` up to each partition's end (the last stable offset under read_committed)."""
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap_servers, "group.id": "onceflow-tests",
                         "enable.partition.eof": True, "isolation.level": isolation, "enable.auto.commit": False})
    try:
        partitions = list(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        messages: list[Any] = []
        ended: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while len(ended) < len(partitions):
            if time.monotonic() > deadline:
                msg = f"{topic} was not read to its end within {timeout_s} s"
                raise TimeoutError(msg)
            for message in consumer.consume(10_000, timeout=0.1):
                error = message.error()
                if error is None:
                    messages.append(message)
                elif error.code() == KafkaError._PARTITION_EOF:
                    ended.add(message.partition() or 0)
                else:
                    raise RuntimeError(f"reading {topic}: {error}")
        return messages
    finally:
        consumer.close()


def open_transactions(bootstrap_servers: str, topic: str) -> list[int]:
    """Partitions of ``topic`` whose last stable offset is behind the high watermark (a transaction is open)."""
    from confluent_kafka import Consumer, TopicPartition

    def ends(isolation: str) -> list[int]:
        consumer = Consumer({"bootstrap.servers": bootstrap_servers, "group.id": "onceflow-tests",
                             "isolation.level": isolation})
        try:
            partitions = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
            return [consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)[1]
                    for p in partitions]
        finally:
            consumer.close()

    return [p for p, (stable, high) in enumerate(zip(ends("read_committed"), ends("read_uncommitted"), strict=True))
            if stable < high]
