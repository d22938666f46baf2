"""herder: a PostgreSQL-backed job/task service.

The public API for writing kinds; see ``herder.kinds`` for the details.
"""

from herder.kinds import (
    JSON,
    FinishedJob,
    InvalidPayload,
    JobContext,
    Kind,
    Retry,
    TaskContext,
    TaskWarning,
    warn,
)
from herder.kinds import synthetic as _synthetic  # noqa: F401  (registers the built-in kind)
from herder.states import JobStatus, TaskStatus

__all__ = [
    "JSON",
    "FinishedJob",
    "InvalidPayload",
    "JobContext",
    "JobStatus",
    "Kind",
    "Retry",
    "TaskContext",
    "TaskStatus",
    "TaskWarning",
    "warn",
]
