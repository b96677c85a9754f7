"""A password given in a DSN or a storage URI shows up nowhere: errors, logs, repr(), checkpoint files, Ray's logs.

The PostgreSQL test server trusts loopback connections, so a DSN carrying a
password connects all the same and the job runs through every failure path
with the secret inside its sink's configuration.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pytest
import ray

import onceflow as of
from onceflow.checkpoint.storage import CheckpointStorage
from onceflow.redaction import dsn_secrets, redact_config, redact_dsn, redact_uri, scrub
from onceflow.testing import failpoints
from tests.postgres_server import PostgresServer

SECRET = "S3cr3t-onceflow-7f1d"


@pytest.mark.parametrize("dsn", [
    f"host=db user=feat password={SECRET} dbname=f",
    f"host=db user=feat password = '{SECRET}' dbname=f",
    f"host=db sslpassword={SECRET}",
    f"postgresql://feat:{SECRET}@db:5432/f",
    f"postgresql://feat@db/f?password={SECRET}&sslmode=require",
])
def test_every_dsn_form_is_redacted_and_its_secret_found(dsn: str) -> None:
    assert SECRET not in redact_dsn(dsn) and "***" in redact_dsn(dsn)
    assert "db" in redact_dsn(dsn)  # the host stays: the message must still say where
    assert dsn_secrets(dsn) == [SECRET]
    assert scrub(f"driver said: bad option near {SECRET}", dsn_secrets(dsn)) == "driver said: bad option near ***"


def test_client_settings_and_storage_uris_are_redacted() -> None:
    config = {"bootstrap.servers": "b:9092", "sasl.password": SECRET, "ssl.key.password": SECRET,
              "sasl.oauthbearer.client.secret": SECRET, "sasl.username": "feat"}
    assert SECRET not in str(redact_config(config)) and redact_config(config)["sasl.username"] == "feat"
    for uri in (f"s3://AKIA:{SECRET}@bucket/chk", f"s3://bucket/chk?secret_key={SECRET}&region=eu"):
        assert SECRET not in redact_uri(uri) and "bucket" in redact_uri(uri)
    assert SECRET not in repr(of.CheckpointConfig(storage=f"s3://AKIA:{SECRET}@bucket/chk"))
    with pytest.raises(of.errors.OnceflowError) as caught:  # an endpoint that refuses: the error names the bucket
        CheckpointStorage(f"s3://AKIA:{SECRET}@bucket/chk?endpoint_override=127.0.0.1:1&scheme=http", "job")
    assert SECRET not in str(caught.value) and SECRET not in repr(caught.value)
    source = of.sources.KafkaSource("b:9092", "t", pa.schema([("x", pa.int64())]), config=config)
    sink = of.sinks.KafkaSink("b:9092", "t", config=config)
    assert SECRET not in repr(source) and SECRET not in repr(sink)


def rows(offset: int, n: int) -> pa.RecordBatch:
    return pa.record_batch({"id": list(range(offset, offset + n)), "v": [i % 7 for i in range(offset, offset + n)]})


def flow(job: str, dsn: str, table: str, *, create: bool = True) -> of.Dataflow:
    dataflow = of.Dataflow(job)
    events = dataflow.source(of.sources.GeneratorSource(rows, total=6_000, batch_size=200, max_events_per_s=3_000))
    events.sink(of.sinks.PostgresSink(dsn, table, create=create), name="pg")
    return dataflow


def ray_logs() -> list[Path]:
    node = ray._private.worker._global_node  # private, but the only way to this session's own log files
    return [p for p in Path(node.get_logs_dir_path()).rglob("*") if p.is_file()]


@pytest.mark.usefixtures("ray_session")
def test_a_postgres_password_leaks_through_no_failure_path(postgres: PostgresServer, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    dsn = f"{postgres.dsn} password={SECRET}"
    storage = str(tmp_path / "chk")
    config = of.CheckpointConfig(interval_s=0.2, storage=storage)
    texts: list[str] = [repr(of.sinks.PostgresSink(dsn, "t")), repr(config)]
    with caplog.at_level(logging.DEBUG, logger="onceflow"):
        # The server cannot be reached.
        with pytest.raises(of.PlanError) as unreachable:
            of.run(flow("secret-unreachable", dsn.replace(f"port={postgres.port}", "port=1"), "t1"),
                   checkpoint=config)
        assert "127.0.0.1" in str(unreachable.value) and "password=***" in str(unreachable.value)
        texts.append(str(unreachable.value))
        # The table does not exist and may not be created: every attempt fails while writing.
        with pytest.raises(of.JobFailedError) as missing:
            of.run(flow("secret-table", dsn, "no_such_table", create=False), checkpoint=config,
                   restart=of.RestartStrategy.fixed_delay(attempts=1, delay_s=0.1), timeout_s=120)
        texts.append(str(missing.value))
        # A commit crashes half way (its process dies), then recovery resolves it; the job ends exact.
        failpoints.arm("secret-commit", "sink.mid_commit")
        try:
            result = of.run(flow("secret-commit", dsn, "t3"), parallelism=2, checkpoint=config,
                            restart=of.RestartStrategy.fixed_delay(attempts=3, delay_s=0.1), timeout_s=120)
        finally:
            failpoints.disarm_all()
        assert result.metrics["restarts"] >= 1
        texts.append(repr(result.metrics))
    texts += [record.getMessage() for record in caplog.records]
    leaked = [t[:200] for t in texts if SECRET in t]
    assert not leaked, leaked
    files = [p for p in Path(storage).rglob("*") if p.is_file()] + ray_logs()
    assert any(p.suffix == ".arrow" for p in files) and any(p.name.startswith("worker") for p in files)
    assert not [p for p in files if SECRET.encode() in p.read_bytes()]
