"""A real Kafka-protocol broker on loopback for the tests, started and stopped by them.

Apache Kafka cannot be installed on these machines (no JVM package registry);
the ``noida-db`` package (PyPI: one native binary) serves the Kafka protocol,
transactions, ``read_committed``, producer fencing and
``send_offsets_to_transaction`` included. Its limits, which the tests must not
lean on: one node without replication, and it never aborts a transaction on
``transaction.timeout.ms`` by itself. Clients are the real librdkafka
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

__all__ = ["KafkaServer", "noida_db"]


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
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": self.bootstrap_servers})
        for future in admin.create_topics([NewTopic(topic, num_partitions=partitions)]).values():
            future.result(timeout=30)

    def destroy(self) -> None:
        """Stop the broker and delete its files."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        shutil.rmtree(self.root, ignore_errors=True)
