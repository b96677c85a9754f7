"""Tests for onceflow.checkpoint.failure_tolerance: counting failed checkpoints, deciding when the job fails."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from onceflow.checkpoint.config import CheckpointConfig
from onceflow.checkpoint.coordinator import CheckpointCoordinator, FailJob
from onceflow.checkpoint.failure_tolerance import (
    COUNTED_REASONS,
    CheckpointFailureReason,
    CheckpointFailureTolerance,
    ToleranceExceeded,
)

Reason = CheckpointFailureReason


def test_expired_declined_and_unwritten_checkpoints_count_subsumed_and_task_failures_do_not() -> None:
    assert {reason for reason in Reason if CheckpointFailureTolerance.counts(reason)} == {
        Reason.EXPIRED,
        Reason.DECLINED,
        Reason.PERSIST_FAILED,
    }
    assert frozenset(reason for reason in Reason if CheckpointFailureTolerance.counts(reason)) == COUNTED_REASONS


@pytest.mark.parametrize("reason", [Reason.SUBSUMED, Reason.TASK_FAILURE])
def test_a_reason_that_does_not_count_changes_nothing(reason: CheckpointFailureReason) -> None:
    tolerance = CheckpointFailureTolerance(tolerable_failures=0)
    assert tolerance.on_failure(1, reason) is None
    assert (tolerance.consecutive_failures, tolerance.failed_count) == (0, 0)


@pytest.mark.parametrize("reason", sorted(COUNTED_REASONS, key=lambda r: r.value))
def test_nothing_tolerated_fails_the_job_on_the_first_failure_with_a_message_that_says_what_to_do(
    reason: CheckpointFailureReason,
) -> None:
    tolerance = CheckpointFailureTolerance(tolerable_failures=0)
    exceeded = tolerance.on_failure(7, reason)
    assert exceeded == ToleranceExceeded(7, reason, consecutive_failures=1, tolerable_failures=0)
    assert exceeded.message == (
        f"checkpoint 7 failed ({reason.value}); 1 consecutive checkpoint failures exceed the 0 tolerated "
        "(CheckpointConfig.tolerable_failures)"
    )


def test_failures_in_a_row_beyond_the_tolerated_fail_the_job_and_keep_failing_it() -> None:
    tolerance = CheckpointFailureTolerance(tolerable_failures=2)
    assert tolerance.on_failure(1, Reason.EXPIRED) is None
    assert tolerance.on_failure(2, Reason.DECLINED) is None
    exceeded = tolerance.on_failure(3, Reason.PERSIST_FAILED)
    assert exceeded is not None and exceeded.consecutive_failures == 3 and exceeded.checkpoint_id == 3
    again = tolerance.on_failure(4, Reason.EXPIRED)
    assert again is not None and again.consecutive_failures == 4


def test_a_success_ends_the_run_of_failures_but_not_the_total() -> None:
    tolerance = CheckpointFailureTolerance(tolerable_failures=1)
    assert tolerance.on_failure(1, Reason.EXPIRED) is None
    tolerance.on_success(2)
    assert (tolerance.consecutive_failures, tolerance.failed_count) == (0, 1)
    assert tolerance.on_failure(3, Reason.DECLINED) is None  # one in a row again: tolerated
    assert tolerance.on_failure(4, Reason.DECLINED) is not None
    assert tolerance.failed_count == 3


def test_an_uncounted_reason_does_not_end_the_run_but_a_reset_does() -> None:
    tolerance = CheckpointFailureTolerance(tolerable_failures=1)
    tolerance.on_failure(1, Reason.EXPIRED)
    tolerance.on_failure(2, Reason.TASK_FAILURE)
    assert tolerance.consecutive_failures == 1
    tolerance.reset()
    assert (tolerance.consecutive_failures, tolerance.failed_count) == (0, 1)
    assert tolerance.on_failure(3, Reason.EXPIRED) is None


EVENTS = st.lists(st.one_of(st.sampled_from(list(Reason)), st.just("success"), st.just("reset")), max_size=40)


@given(tolerable=st.integers(0, 3), events=EVENTS)
def test_the_job_fails_exactly_when_counted_failures_since_the_last_success_exceed_the_tolerated(
    tolerable: int, events: list[CheckpointFailureReason | str]
) -> None:
    tolerance = CheckpointFailureTolerance(tolerable)
    in_a_row = total = 0
    for checkpoint_id, event in enumerate(events, start=1):
        if event == "success":
            tolerance.on_success(checkpoint_id)
            in_a_row = 0
        elif event == "reset":
            tolerance.reset()
            in_a_row = 0
        else:
            assert isinstance(event, Reason)
            exceeded = tolerance.on_failure(checkpoint_id, event)
            if event in COUNTED_REASONS:
                in_a_row += 1
                total += 1
            assert (exceeded is not None) == (event in COUNTED_REASONS and in_a_row > tolerable)
        assert (tolerance.consecutive_failures, tolerance.failed_count) == (in_a_row, total)


def test_the_coordinator_fails_the_job_with_the_tolerances_message() -> None:
    now = [0.0]
    coordinator = CheckpointCoordinator(CheckpointConfig(interval_s=1.0, tolerable_failures=1), ["a"], lambda: now[0])
    coordinator.poll()
    assert not any(isinstance(a, FailJob) for a in coordinator.on_decline(1, "a"))
    now[0] = 1.0
    coordinator.poll()
    [fail] = [a for a in coordinator.on_decline(2, "a") if isinstance(a, FailJob)]
    assert fail.reason == ToleranceExceeded(2, Reason.DECLINED, 2, 1).message
    assert coordinator.failures.failed_count == coordinator.failed_count == 2
