"""Running one task's handler, and turning what it returns or raises into an Outcome.

Nothing here touches the database or the worker's bookkeeping: the worker decides when a
task runs and hands its outcome to the completer. A PENDING outcome is a retry, due
after its ``delay``.
"""

from __future__ import annotations

import math
import traceback
from typing import Any

import anyio
import structlog

from herder.db import NotStorable, Pool, Undecodable, encode_json
from herder.kinds import Kind, Retry, TaskContext, TaskWarning, describe, get_kind, message_of
from herder.kinds.processes import ProcessDied
from herder.states import TaskStatus
from herder.store import ClaimedTask, Outcome

log = structlog.get_logger("herder.execution")


async def execute(task: ClaimedTask, pool: Pool, max_result_bytes: int) -> Outcome:
    """Run ``task``'s handler (``pool`` is the kinds' own) and say how the attempt ended.
    A cancellation passes through: whoever cancelled decides what is written."""
    attempt = task.attempts - task.attempts_base
    kind = get_kind(task.kind)
    if task.stopped:
        return canceled(task, "canceled before it started")
    if kind is None:
        return _outcome(task, TaskStatus.FAILURE, f"unknown kind {task.kind!r}")
    if isinstance(task.payload, Undecodable):
        return _outcome(
            task, TaskStatus.FAILURE, f"task payload cannot be decoded: {task.payload.error}"
        )
    context = TaskContext(
        id=task.id,
        job_id=task.job_id,
        seq=task.seq,
        payload=task.payload,
        attempt=attempt,
        max_attempts=kind.max_attempts,
        pool=pool,
    )
    try:
        return _result_outcome(task, await _call(kind, context), max_result_bytes)
    except _TimedOut:
        return _failed(task, kind, attempt, f"timed out after {kind.timeout}s", None, True)
    except Retry as exc:
        message = message_of(exc) or "retry requested"
        return _failed(task, kind, attempt, message, exc.delay, True)
    except Exception as exc:
        # A worker process dying under the task is a lost worker: retried.
        retriable = isinstance(exc, (*kind.retry_on, ProcessDied))
        message = message_of(exc) or type(exc).__name__
        return _failed(task, kind, attempt, message, None, retriable)
    except (SystemExit, KeyboardInterrupt, GeneratorExit) as exc:
        # The handler's own end, not the daemon's: its task fails, never retried.
        return _failed(task, kind, attempt, describe(exc), None, False)


def canceled(task: ClaimedTask, message: str) -> Outcome:
    return _outcome(task, TaskStatus.CANCELED, message)


def _result_outcome(task: ClaimedTask, value: Any, max_result_bytes: int) -> Outcome:
    status, message = TaskStatus.SUCCESS, None
    if isinstance(value, TaskWarning):
        status, message, value = TaskStatus.WARNING, _text(value.message), value.result
    if value is None:
        return _outcome(task, status, message)
    try:
        result = encode_json(value)
    except NotStorable as exc:
        return _outcome(
            task,
            TaskStatus.FAILURE,
            f"process returned a result PostgreSQL cannot store: {exc}",
        )
    except Exception as exc:  # TypeError, ValueError, or a hostile __eq__/__str__
        return _outcome(
            task,
            TaskStatus.FAILURE,
            f"process returned a result that is not JSON: {describe(exc)}",
        )
    if len(result) > max_result_bytes:
        return _outcome(
            task,
            TaskStatus.FAILURE,
            f"process returned a result of {len(result)} bytes; the limit is "
            f"{max_result_bytes} (herder.settings max_result_bytes)",
        )
    return _outcome(task, status, message, result_json=result.decode())


def _failed(
    task: ClaimedTask,
    kind: Kind,
    attempt: int,
    message: str,
    delay: float | None,
    retriable: bool,
) -> Outcome:
    trace = _traceback()
    if retriable and attempt < kind.max_attempts:
        return _outcome(
            task,
            TaskStatus.PENDING,
            f"attempt {attempt} failed: {message}",
            traceback=trace,
            delay=_retry_delay(kind, attempt, delay),
        )
    if retriable:
        message = f"gave up after {attempt} attempts: {message}"
    log.warning("task failed", job_id=task.job_id, task_id=task.id, attempt=attempt, error=message)
    return _outcome(task, TaskStatus.FAILURE, message, traceback=trace)


def _outcome(
    task: ClaimedTask,
    status: TaskStatus,
    message: str | None,
    *,
    result_json: str | None = None,
    traceback: str | None = None,
    delay: float = 0.0,
) -> Outcome:
    return Outcome(
        task.id,
        task.job_id,
        task.attempts,
        status.value,
        message,
        result_json,
        traceback,
        delay,
        kind=task.kind,
    )


def _text(value: object) -> str:
    return value if isinstance(value, str) else message_of(Exception(value))


def _traceback() -> str:
    try:
        return traceback.format_exc()
    except Exception:  # a hostile exception can break the formatting too
        return "(the traceback could not be formatted)"


def _retry_delay(kind: Kind, attempt: int, asked: object) -> float:
    """The delay a Retry asked for, clamped to [0, the kind's max_backoff]; the kind's
    own backoff when it asked for none, or for something that is not a number."""
    if asked is None:
        return kind.retry_delay(attempt)
    try:
        delay = float(asked)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return kind.retry_delay(attempt)
    if math.isnan(delay):
        return kind.retry_delay(attempt)
    return min(max(delay, 0.0), kind.max_backoff)


class _TimedOut(Exception):
    """The kind's timeout expired. Distinct from a TimeoutError the handler raises itself,
    which is an ordinary failure (retried only if the kind declares it retriable)."""


async def _call(kind: Kind, context: TaskContext) -> Any:
    if kind.timeout is None:
        return await kind.process_fn(context)
    with anyio.move_on_after(kind.timeout) as deadline:
        return await kind.process_fn(context)
    if deadline.cancelled_caught:
        raise _TimedOut
    raise AssertionError("unreachable: the handler neither returned nor timed out")
