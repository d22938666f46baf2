"""The state machine, exhaustively, without a database."""

from __future__ import annotations

import itertools

import pytest

from herder.states import (
    JOB_FINISHED,
    JOB_SETTLEABLE,
    JOB_TRANSITIONS,
    Event,
    JobStatus,
    TaskCounts,
    allowed,
    settle,
)

J = JobStatus

# Every combination of 0, 1 or 2 tasks in each of the six task statuses.
ALL_COUNTS = [TaskCounts(*combo) for combo in itertools.product(range(3), repeat=6)]


def expected(status: JobStatus, c: TaskCounts) -> JobStatus | None:
    """The contract's settlement rule, written independently of the implementation."""
    if status not in (J.PENDING, J.IN_PROGRESS, J.CANCELING):
        return None
    if c.pending or c.in_progress:
        return None
    if status == J.CANCELING:
        return J.CANCELED
    if c.failure:
        return J.FAILURE
    if c.warning:
        return J.WARNING
    if c.success or c.total == 0:
        return J.SUCCESS
    return J.CANCELED


@pytest.mark.parametrize("status", list(JobStatus))
def test_settle_matches_the_contract_for_every_combination(status: JobStatus) -> None:
    for counts in ALL_COUNTS:
        result = settle(status, counts)
        want = expected(status, counts)
        assert (result.status if result else None) == want, (status, counts)


def test_settlements_are_allowed_transitions() -> None:
    for status, counts in itertools.product(JOB_SETTLEABLE, ALL_COUNTS):
        result = settle(status, counts)
        if result is not None:
            assert result.status in allowed(status, Event.SETTLE)


def test_zero_tasks_is_success_no_tasks() -> None:
    assert settle(J.PENDING, TaskCounts()) == settle(J.IN_PROGRESS, TaskCounts())
    result = settle(J.PENDING, TaskCounts())
    assert result is not None
    assert (result.status, result.message) == (J.SUCCESS, "no tasks")


def test_all_canceled_is_canceled_not_a_crash() -> None:
    result = settle(J.IN_PROGRESS, TaskCounts(canceled=5))
    assert result is not None and result.status == J.CANCELED


def test_success_message_says_some_were_canceled() -> None:
    result = settle(J.IN_PROGRESS, TaskCounts(success=3, canceled=2))
    assert result is not None
    assert result.status == J.SUCCESS
    assert "2 canceled" in result.message


def test_canceling_wins_over_failures() -> None:
    result = settle(J.CANCELING, TaskCounts(failure=3, success=1))
    assert result is not None and result.status == J.CANCELED


def test_finished_jobs_never_settle_again() -> None:
    for status, counts in itertools.product(JOB_FINISHED, ALL_COUNTS):
        assert settle(status, counts) is None


def test_only_finished_jobs_restart_and_only_canceled_resume() -> None:
    restartable = {s for s in JobStatus if allowed(s, Event.RESTART)}
    assert restartable == set(JOB_FINISHED)
    assert {s for s in JobStatus if allowed(s, Event.RESUME)} == {J.CANCELED}
    assert {s for s in JobStatus if allowed(s, Event.RETRY)} == {J.FAILURE}
    assert {s for s in JobStatus if allowed(s, Event.VERIFY)} == {J.UNVERIFIED}


def test_cancel_applies_exactly_to_unfinished_jobs() -> None:
    cancelable = {s for s in JobStatus if allowed(s, Event.CANCEL)}
    assert cancelable == {J.UNVERIFIED, J.PREPARING, J.PENDING, J.IN_PROGRESS}


def test_every_status_is_reachable_from_submission() -> None:
    reached = {J.UNVERIFIED, J.PREPARING}
    frontier = list(reached)
    while frontier:
        status = frontier.pop()
        for (source, _event), targets in JOB_TRANSITIONS.items():
            if source == status:
                for target in targets - reached:
                    reached.add(target)
                    frontier.append(target)
    assert reached == set(JobStatus)
