"""CheckpointConfig validation, RestartStrategy delays and RestartTracker."""

from __future__ import annotations

import math
import pickle

import pytest

from onceflow.checkpoint.config import CheckpointConfig
from onceflow.errors import PlanError
from onceflow.runtime.restart import RestartStrategy, RestartTracker


def test_defaults() -> None:
    config = CheckpointConfig()
    assert (config.interval_s, config.storage, config.mode, config.timeout_s) == (1.0, "checkpoints", "aligned", 60.0)
    assert (config.min_pause_s, config.max_concurrent, config.retain, config.tolerable_failures) == (0.0, 1, 3, 0)


def test_config_is_frozen_and_picklable() -> None:
    config = CheckpointConfig(interval_s=0.2, storage="s3://bucket/prefix", retain=5, tolerable_failures=2)
    with pytest.raises(AttributeError):
        config.retain = 1  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(config)) == config


@pytest.mark.parametrize("mode", ["Aligned", "exactly-once", ""])
def test_a_mode_is_aligned_or_unaligned(mode: str) -> None:
    with pytest.raises(PlanError, match="unknown checkpoint mode .*use mode='aligned' or mode='unaligned'$"):
        CheckpointConfig(mode=mode)


def test_the_alignment_timeout_is_seconds_and_only_for_aligned_checkpoints() -> None:
    assert CheckpointConfig(aligned_timeout_s=0.2).aligned_timeout_s == 0.2
    with pytest.raises(PlanError, match="aligned_timeout_s must be >= 0"):
        CheckpointConfig(aligned_timeout_s=-1)
    with pytest.raises(PlanError, match="aligned_timeout_s applies to mode='aligned' only"):
        CheckpointConfig(mode="unaligned", aligned_timeout_s=0.2)


@pytest.mark.parametrize(("options", "words"), [
    ({"interval_s": 0}, "interval_s must be > 0"),
    ({"interval_s": -1.0}, "interval_s must be > 0"),
    ({"interval_s": math.nan}, "interval_s must be a number"),
    ({"interval_s": "1"}, "interval_s must be a number"),
    ({"timeout_s": 0.0}, "timeout_s must be > 0"),
    ({"min_pause_s": -0.1}, "min_pause_s must be >= 0"),
    ({"max_concurrent": 0}, "max_concurrent must be >= 1"),
    ({"max_concurrent": 1.5}, "max_concurrent must be an integer"),
    ({"retain": 0}, "retain must be >= 1"),
    ({"retain": True}, "retain must be an integer"),
    ({"tolerable_failures": -1}, "tolerable_failures must be >= 0"),
    ({"storage": ""}, "storage must be a non-empty"),
])
def test_config_validation(options: dict[str, object], words: str) -> None:
    with pytest.raises(PlanError, match=words) as caught:
        CheckpointConfig(**options)  # type: ignore[arg-type]
    message = str(caught.value)
    assert message[0].islower()
    assert "; " in message  # ends with what to do


def test_config_accepts_edges() -> None:
    config = CheckpointConfig(interval_s=0.001, min_pause_s=0, max_concurrent=4, retain=1, tolerable_failures=10)
    assert config.max_concurrent == 4


def test_fixed_delay() -> None:
    strategy = RestartStrategy.fixed_delay(attempts=3, delay_s=0.25)
    assert [strategy.delay_for(n) for n in range(1, 6)] == [0.25, 0.25, 0.25, None, None]


def test_exponential_backoff_is_capped() -> None:
    strategy = RestartStrategy.exponential_backoff(initial_s=0.5, max_s=3.0, attempts=6)
    assert [strategy.delay_for(n) for n in range(1, 8)] == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0, None]
    tripling = RestartStrategy.exponential_backoff(initial_s=1.0, max_s=100.0, attempts=4, multiplier=3.0)
    assert [tripling.delay_for(n) for n in range(1, 5)] == [1.0, 3.0, 9.0, 27.0]


def test_exponential_backoff_never_overflows() -> None:
    strategy = RestartStrategy.exponential_backoff(initial_s=1.0, max_s=60.0, attempts=10_000)
    assert strategy.delay_for(10_000) == 60.0


def test_no_restart_and_default() -> None:
    assert RestartStrategy.no_restart().delay_for(1) is None
    assert RestartStrategy.default() == RestartStrategy.fixed_delay(attempts=3, delay_s=0.5)
    assert RestartStrategy.fixed_delay(attempts=0, delay_s=1.0).delay_for(1) is None


@pytest.mark.parametrize(("build", "words"), [
    (lambda: RestartStrategy.fixed_delay(attempts=-1, delay_s=1.0), "attempts must be >= 0"),
    (lambda: RestartStrategy.fixed_delay(attempts=2, delay_s=-1.0), "delay_s must be >= 0"),
    (lambda: RestartStrategy.exponential_backoff(initial_s=2.0, max_s=1.0, attempts=3), "below initial_s"),
    (lambda: RestartStrategy.exponential_backoff(initial_s=1.0, max_s=2.0, attempts=3, multiplier=0.5),
     "multiplier must be >= 1"),
    (lambda: RestartStrategy(kind="sometimes"), "unknown restart strategy"),  # type: ignore[arg-type]
])
def test_strategy_validation(build: object, words: str) -> None:
    with pytest.raises(PlanError, match=words):
        build()  # type: ignore[operator]


def test_delay_for_counts_from_one() -> None:
    with pytest.raises(PlanError, match="count attempts from 1"):
        RestartStrategy.default().delay_for(0)


def test_tracker_gives_up_after_attempts() -> None:
    tracker = RestartTracker(RestartStrategy.exponential_backoff(initial_s=0.1, max_s=0.3, attempts=3))
    assert [tracker.on_failure() for _ in range(5)] == [0.1, 0.2, 0.3, None, None]
    assert tracker.attempts == 3


def test_tracker_without_restarts() -> None:
    tracker = RestartTracker(RestartStrategy.no_restart())
    assert tracker.on_failure() is None
    assert tracker.attempts == 0
