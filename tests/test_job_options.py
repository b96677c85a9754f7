"""JobOptions: one validated value for run and submit, built from keywords or given whole, never both."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

import onceflow as of
from onceflow.errors import PlanError
from onceflow.runtime.options import JobOptions
from onceflow.runtime.restart import RestartStrategy


def _flow() -> of.Dataflow:
    flow = of.Dataflow("options")
    flow.source(of.sources.TestingSource([{"x": 1}])).sink(of.sinks.TestingSink())
    return flow


def test_keywords_build_the_same_options_as_the_value() -> None:
    config = of.CheckpointConfig(interval_s=0.5, storage="/tmp/chk")
    keywords: dict[str, Any] = {"parallelism": 2, "checkpoint": config, "credits": 3, "chaining": False}
    assert JobOptions.from_keywords(None, keywords) == JobOptions(  # type: ignore[arg-type]
        parallelism=2, checkpoint=config, credits=3, chaining=False
    )
    assert JobOptions.from_keywords(None, {}) == JobOptions()


def test_defaults_are_the_documented_ones() -> None:
    options = JobOptions()
    assert (options.parallelism, options.max_parallelism, options.chaining, options.resume) == (1, 128, True, False)
    assert options.checkpoint is None and options.restart is None
    assert options.restart_strategy == RestartStrategy.default()
    fixed = RestartStrategy.fixed_delay(attempts=1, delay_s=0.0)
    assert JobOptions(restart=fixed).restart_strategy == fixed


def test_options_are_frozen_picklable_and_public() -> None:
    options = JobOptions(parallelism=3, actor_options={"num_cpus": 1})
    with pytest.raises(AttributeError):
        options.parallelism = 1  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(options)) == options
    assert of.JobOptions is JobOptions
    assert of.RestartStrategy is RestartStrategy


def test_placement_defaults_to_spread_and_pins_are_stored_as_tuples() -> None:
    assert JobOptions().placement == "spread"
    assert JobOptions(placement="pack").placement == "pack"
    options = JobOptions(placement={"window": "node-a", "source": ["node-b", "node-c"]})
    assert options.placement == {"window": ("node-a",), "source": ("node-b", "node-c")}
    assert pickle.loads(pickle.dumps(options)) == options


def test_actor_options_are_copied() -> None:
    given = {"num_cpus": 1}
    options = JobOptions(actor_options=given)
    given["num_cpus"] = 2
    assert options.actor_options == {"num_cpus": 1}


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"parallelism": 0}, "parallelism must be >= 1"),
        ({"parallelism": 1.5}, "parallelism must be an integer"),
        ({"max_parallelism": 0}, "max_parallelism must be >= 1"),
        ({"batch_bytes": 0}, "batch_bytes must be >= 1"),
        ({"linger_s": -1.0}, "linger_s must be >= 0"),
        ({"linger_s": float("inf")}, "linger_s must be finite"),
        ({"credits": 0}, "credits must be >= 1"),
        ({"chaining": "yes"}, "chaining must be True or False"),
        ({"checkpoint": "checkpoints/"}, "checkpoint must be a CheckpointConfig"),
        ({"restart": 3}, "restart must be a RestartStrategy"),
        ({"actor_options": ["num_cpus"]}, "actor_options must be a dict"),
        ({"address": 6379}, "address must be a string"),
        ({"resume": True}, "resume=True needs checkpoint="),
        ({"placement": "random"}, "placement must be one of 'spread', 'pack'"),
        ({"placement": 3}, "placement must be 'spread', 'pack' or a mapping"),
        ({"placement": {"window": []}}, "placement pins operator 'window' to"),
        ({"placement": {"window": 7}}, "placement pins operator 'window' to 7"),
    ],
)
def test_invalid_options_are_plan_errors_that_say_what_to_do(options: dict[str, Any], words: str) -> None:
    with pytest.raises(PlanError, match=words) as caught:
        JobOptions(**options)
    message = str(caught.value)
    assert message[0].islower()
    assert "; " in message or "needs" in message


def test_replace_validates_again() -> None:
    options = JobOptions(parallelism=2)
    assert options.replace(credits=4) == JobOptions(parallelism=2, credits=4)
    with pytest.raises(PlanError, match="credits must be >= 1"):
        options.replace(credits=0)


@pytest.mark.parametrize("call", [of.run, of.submit])
def test_options_and_keywords_together_are_refused_before_anything_runs(call: Any) -> None:
    with pytest.raises(PlanError, match=r"either options=JobOptions\(\.\.\.\) or keyword options \(parallelism\)"):
        call(_flow(), options=JobOptions(), parallelism=2)


@pytest.mark.parametrize("call", [of.run, of.submit])
def test_an_unknown_keyword_is_a_type_error(call: Any) -> None:
    with pytest.raises(TypeError, match="paralelism"):
        call(_flow(), paralelism=2)


def test_options_must_be_a_job_options() -> None:
    with pytest.raises(PlanError, match="options must be a JobOptions"):
        of.run(_flow(), options={"parallelism": 2})  # type: ignore[arg-type]


@pytest.mark.usefixtures("ray_session")
def test_a_job_runs_from_options_as_from_keywords() -> None:
    rows = [{"user_id": i % 5, "amount": float(i)} for i in range(200)]
    sink = of.sinks.TestingSink()
    flow = of.Dataflow("options-run")
    flow.source(of.sources.TestingSource(rows, batch_size=16)).key_by("user_id").reduce(
        lambda a, b: {"user_id": a["user_id"], "amount": a["amount"] + b["amount"]}, name="total"
    ).sink(sink)
    result = of.run(flow, options=JobOptions(parallelism=2, credits=1, linger_s=0.01), timeout_s=120)
    assert result.metrics["events_in"] == 200
    final = {}
    for row in sink.table().to_pylist():
        final[row["user_id"]] = row["amount"]
    assert final == {u: float(sum(i for i in range(200) if i % 5 == u)) for u in range(5)}
