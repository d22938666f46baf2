"""The state machine: statuses, the transitions allowed between them, and settlement.

Everything here is pure. The SQL in ``sql/`` applies these rules; the tests in
``tests/test_states.py`` check them exhaustively without a database.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class JobStatus(enum.StrEnum):
    UNVERIFIED = "UNVERIFIED"
    PREPARING = "PREPARING"
    PENDING = "PENDING"
    IN_PROGRESS = "IN_PROGRESS"
    CANCELING = "CANCELING"
    CANCELED = "CANCELED"
    SUCCESS = "SUCCESS"
    WARNING = "WARNING"
    FAILURE = "FAILURE"


class TaskStatus(enum.StrEnum):
    PENDING = "PENDING"
    IN_PROGRESS = "IN_PROGRESS"
    CANCELED = "CANCELED"
    SUCCESS = "SUCCESS"
    WARNING = "WARNING"
    FAILURE = "FAILURE"


J = JobStatus
T = TaskStatus

#: Job statuses under which a task may be IN_PROGRESS (the contract's invariant).
JOB_RUNS_TASKS = frozenset({J.PENDING, J.IN_PROGRESS, J.CANCELING})
#: Job statuses that settlement may end.
JOB_SETTLEABLE = frozenset({J.PENDING, J.IN_PROGRESS, J.CANCELING})
JOB_FINISHED = frozenset({J.CANCELED, J.SUCCESS, J.WARNING, J.FAILURE})
#: Settlements after which the kind's on_finished hook runs.
JOB_HOOKED = frozenset({J.SUCCESS, J.WARNING, J.FAILURE})
TASK_ACTIVE = frozenset({T.PENDING, T.IN_PROGRESS})


class Event(enum.StrEnum):
    """Everything that moves a job. Each name is a function, query or daemon step."""

    VERIFY = "verify"  # herder.verify_job
    PREPARED = "prepared"  # the coordinator committed the tasks
    PREPARE_FAILED = "prepare_failed"  # bad payload, prepare raised (or a kind it cannot load)
    FIRST_TASK_STARTED = "first_task_started"
    CANCEL = "cancel"  # herder.cancel_job
    SETTLE = "settle"  # no task PENDING or IN_PROGRESS any more
    RESUME = "resume"  # herder.resume_job
    RETRY = "retry"  # herder.retry_job
    RESTART = "restart"  # herder.restart_job


#: The allowed job transitions: (from, event) -> the possible destinations.
JOB_TRANSITIONS: dict[tuple[JobStatus, Event], frozenset[JobStatus]] = {
    (J.UNVERIFIED, Event.VERIFY): frozenset({J.PREPARING}),
    (J.UNVERIFIED, Event.CANCEL): frozenset({J.CANCELING}),
    (J.PREPARING, Event.PREPARED): frozenset({J.PENDING}),
    (J.PREPARING, Event.PREPARE_FAILED): frozenset({J.FAILURE}),
    (J.PREPARING, Event.CANCEL): frozenset({J.CANCELING}),
    (J.PENDING, Event.FIRST_TASK_STARTED): frozenset({J.IN_PROGRESS}),
    (J.PENDING, Event.CANCEL): frozenset({J.CANCELING}),
    (J.PENDING, Event.SETTLE): frozenset({J.SUCCESS, J.WARNING, J.FAILURE, J.CANCELED}),
    (J.IN_PROGRESS, Event.CANCEL): frozenset({J.CANCELING}),
    (J.IN_PROGRESS, Event.SETTLE): frozenset({J.SUCCESS, J.WARNING, J.FAILURE, J.CANCELED}),
    (J.CANCELING, Event.SETTLE): frozenset({J.CANCELED}),
    # A job never verified goes back to UNVERIFIED: only verify_job lets it further.
    (J.CANCELED, Event.RESUME): frozenset({J.PENDING, J.PREPARING, J.UNVERIFIED}),
    (J.FAILURE, Event.RETRY): frozenset({J.PENDING, J.PREPARING}),
    **{(s, Event.RESTART): frozenset({J.PREPARING, J.UNVERIFIED}) for s in JOB_FINISHED},
}


def allowed(status: JobStatus, event: Event) -> frozenset[JobStatus]:
    """Where ``event`` may take a job in ``status``; empty when it does not apply."""
    return JOB_TRANSITIONS.get((status, event), frozenset())


@dataclass(frozen=True, slots=True)
class TaskCounts:
    pending: int = 0
    in_progress: int = 0
    success: int = 0
    warning: int = 0
    failure: int = 0
    canceled: int = 0

    @property
    def total(self) -> int:
        return (
            self.pending
            + self.in_progress
            + self.success
            + self.warning
            + self.failure
            + self.canceled
        )

    @property
    def active(self) -> int:
        return self.pending + self.in_progress


@dataclass(frozen=True, slots=True)
class Settlement:
    status: JobStatus
    message: str


def settle(status: JobStatus, counts: TaskCounts) -> Settlement | None:
    """The final status of a job, or None while it cannot settle yet.

    A job settles when none of its tasks is PENDING or IN_PROGRESS. The order of the
    rules is the contract's: CANCELING wins, then any failure, any warning, any success;
    a job whose every task was canceled is CANCELED.
    """
    if status not in JOB_SETTLEABLE or counts.active:
        return None
    done = f"{counts.total - counts.canceled} of {counts.total} tasks finished"
    if status is J.CANCELING:
        return Settlement(J.CANCELED, f"canceled; {done}")
    if counts.total == 0:
        return Settlement(J.SUCCESS, "no tasks")
    canceled = f", {counts.canceled} canceled" if counts.canceled else ""
    if counts.failure:
        return Settlement(J.FAILURE, f"{counts.failure} of {counts.total} tasks failed{canceled}")
    if counts.warning:
        return Settlement(
            J.WARNING, f"{counts.warning} of {counts.total} tasks with warnings{canceled}"
        )
    if counts.success:
        return Settlement(
            J.SUCCESS, f"{counts.success} of {counts.total} tasks succeeded{canceled}"
        )
    return Settlement(J.CANCELED, f"all {counts.total} tasks canceled")
