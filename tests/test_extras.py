"""psycopg, confluent-kafka and matplotlib are optional: the postgres, kafka and bench extras bring them."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest
from packaging.requirements import Requirement

import onceflow as of

OPTIONAL = {"psycopg": "postgres", "confluent-kafka": "kafka", "matplotlib": "bench"}


def _requirements() -> list[Requirement]:
    return [Requirement(line) for line in importlib.metadata.requires("onceflow") or []]


def test_the_core_install_requires_neither_psycopg_nor_matplotlib() -> None:
    for requirement in _requirements():
        if requirement.name in OPTIONAL:
            extra = OPTIONAL[requirement.name]
            assert requirement.marker is not None, f"{requirement} is a core dependency"
            assert requirement.marker.evaluate({"extra": extra}), requirement
            assert not requirement.marker.evaluate({"extra": ""}), requirement


def test_the_test_extra_brings_the_postgres_kafka_and_bench_extras() -> None:
    in_test = [r for r in _requirements() if r.marker and r.marker.evaluate({"extra": "test"})]
    assert any(r.name == "onceflow" and {"bench", "kafka", "postgres"} <= r.extras for r in in_test), in_test


def test_onceflow_imports_and_plans_a_job_without_psycopg_confluent_kafka_and_matplotlib() -> None:
    script = (
        "import sys\n"
        "sys.modules['psycopg'] = sys.modules['matplotlib'] = sys.modules['confluent_kafka'] = None\n"
        "import onceflow as of\n"
        "from onceflow.runtime.plan import plan\n"
        "flow = of.Dataflow('core')\n"
        "flow.source(of.sources.GeneratorSource(lambda offset, n: None, total=0)).sink(\n"
        "    of.sinks.PostgresSink('host=127.0.0.1', 'features'))\n"
        "print(len(plan(flow).vertices))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"


def test_a_postgres_sink_without_psycopg_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)
    sink = of.sinks.PostgresSink("host=127.0.0.1 dbname=features", "user_windows")
    expected = r"postgres sink user_windows: psycopg is not installed.*onceflow\[postgres\]"
    with pytest.raises(of.PlanError, match=expected):
        sink.prepare()


def test_a_kafka_source_without_confluent_kafka_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "confluent_kafka", None)
    source = of.sources.KafkaSource("127.0.0.1:9092", "clicks", format="raw")
    expected = r"kafka source 'clicks': confluent-kafka is not installed.*onceflow\[kafka\]"
    with pytest.raises(of.PlanError, match=expected):
        source.max_parallelism()
