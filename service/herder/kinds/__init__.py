"""The kind API: how a user teaches herder what a job of some kind means.

A kind has a ``prepare`` that yields one payload per task, a ``process`` that runs one
task, and optionally an ``on_finished`` hook::

    import herder

    report = herder.Kind("report", max_attempts=5, retry_on=(ConnectionError,), timeout=60)

    @report.prepare
    async def prepare(job: herder.JobContext) -> AsyncIterator[herder.JSON]:
        for chunk in range(job.payload["chunks"]):
            yield {"chunk": chunk}

    @report.process
    async def process(task: herder.TaskContext) -> herder.JSON:
        return {"rows": 42}

Creating a ``Kind`` registers it; ``herder run --app mymodule`` imports the module.
"""

from __future__ import annotations

import functools
import importlib
import os
import random
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

from herder.errors import innermost
from herder.kinds import plain

if TYPE_CHECKING:
    from herder.db import Pool

JSON: TypeAlias = Any
"""A value that json.dumps accepts: dict, list, str, int, float, bool or None."""


class Retry(Exception):
    """Raise from ``process`` to run the task again after a backoff.

    ``delay`` overrides the kind's backoff for this retry (seconds).
    """

    def __init__(self, message: str = "", *, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class InvalidPayload(ValueError):
    """Raise from ``prepare`` when the job's payload is wrong; the message names the key."""


@dataclass(frozen=True, slots=True)
class TaskWarning:
    """Returned by ``process`` (via :func:`warn`): the task ends WARNING."""

    message: str
    result: JSON = None


def warn(message: str, result: JSON = None) -> TaskWarning:
    """End the task as WARNING with ``message`` (and an optional result)."""
    return TaskWarning(message, result)


@dataclass(frozen=True, slots=True)
class JobContext:
    """What ``prepare`` sees of its job."""

    id: int
    kind: str
    payload: JSON
    priority: int
    owner: str
    #: How many tasks an earlier, interrupted preparation already committed. A kind made
    #: with ``prepare_resumes=True`` must start yielding at this index; otherwise herder
    #: skips that many yielded payloads itself (so ``prepare`` must be deterministic).
    resume_from: int
    pool: Pool = field(repr=False)
    #: herder.settings max_tasks_per_job: a job yielding more fails at the first task past
    #: it. A prepare that knows its count up front should refuse a larger job itself,
    #: before yielding anything (raise InvalidPayload).
    max_tasks: int = 10_000_000


@dataclass(frozen=True, slots=True)
class TaskContext:
    """What ``process`` sees of its task."""

    id: int
    job_id: int
    #: The task's 0-based position in its job's preparation.
    seq: int
    payload: JSON
    #: 1 on the first run, counting again from 1 after ``retry_job``.
    attempt: int
    max_attempts: int
    pool: Pool = field(repr=False)


@dataclass(frozen=True, slots=True)
class FinishedJob:
    """What ``on_finished`` sees: the job just settled SUCCESS, WARNING or FAILURE."""

    id: int
    kind: str
    payload: JSON
    status: str
    message: str | None
    owner: str
    pool: Pool = field(repr=False)


#: What a kind declares: ``async`` or plain (plain ones run in worker threads, see
#: herder.kinds.plain). A prepare is an (async) generator, or returns an iterable.
PrepareFn: TypeAlias = Callable[[JobContext], "AsyncIterator[JSON] | Iterable[JSON]"]
ProcessFn: TypeAlias = Callable[[TaskContext], Any]
FinishedFn: TypeAlias = Callable[[FinishedJob], Any]
# The decorators hand back the function as declared, type and all.
_Prepare = TypeVar("_Prepare", bound=PrepareFn)
_Process = TypeVar("_Process", bound=ProcessFn)
_Finished = TypeVar("_Finished", bound=FinishedFn)

_REGISTRY: dict[str, Kind] = {}


class KindError(Exception):
    """A kind was declared wrongly, or an app could not be loaded."""


#: What a kind's code may raise that herder contains: the task, preparation or hook
#: fails, never the daemon. SystemExit, KeyboardInterrupt and GeneratorExit raised by a
#: handler mean the handler's own end, not the daemon's. (Cancellation is not in here:
#: herder's own timeouts and cancels pass through.)
KIND_CODE_ERRORS: tuple[type[BaseException], ...] = (
    Exception,
    SystemExit,
    KeyboardInterrupt,
    GeneratorExit,
)


def message_of(exc: BaseException) -> str:
    """str(exc), even when its ``__str__`` raises too (the message is made storable
    where it is written)."""
    try:
        return str(exc)
    except Exception:  # a hostile __str__
        return f"{type(exc).__name__} (str() of the exception raised)"


def describe(exc: BaseException | None) -> str:
    """``Type: message`` for an exception raised by a kind's code (for a group, its first
    exception)."""
    if exc is None:
        return "unknown error"
    exc = innermost(exc)
    text = message_of(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _job_as_one_task(job: JobContext) -> AsyncIterator[JSON]:
    """The prepare of a kind that declares none: one task, the job's payload."""
    yield job.payload


class Kind:
    """A kind of job. Decorate its ``prepare``, ``process`` and ``on_finished``."""

    def __init__(
        self,
        name: str,
        *,
        max_attempts: int = 3,
        retry_on: tuple[type[BaseException], ...] = (),
        timeout: float | None = None,
        backoff: float = 1.0,
        max_backoff: float = 300.0,
        prepare_resumes: bool = False,
        executor: str = "thread",
        max_running: int | None = None,
    ) -> None:
        if not name:
            raise KindError("a kind needs a name")
        if max_attempts < 1:
            raise KindError(f"kind {name!r}: max_attempts must be at least 1")
        if timeout is not None and timeout <= 0:
            raise KindError(f"kind {name!r}: timeout must be positive")
        if max_running is not None and max_running < 0:
            raise KindError(f"kind {name!r}: max_running must be at least 0")
        if executor not in ("thread", "process"):
            raise KindError(f"kind {name!r}: executor must be 'thread' or 'process'")
        if name in _REGISTRY:
            raise KindError(f"kind {name!r} is declared twice")
        self.name = name
        self.max_attempts = max_attempts
        self.retry_on = retry_on
        self.timeout = timeout
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.prepare_resumes = prepare_resumes
        #: Where plain handlers run: worker threads, or worker processes
        #: (herder.kinds.processes) for CPU-bound code.
        self.executor = executor
        #: Tasks of this kind IN_PROGRESS at once across the fleet, at most: the first
        #: value of its herder.kinds row (an operator's UPDATE there wins).
        self.max_running = max_running
        #: The plain handlers of an executor="process" kind, as declared, by name
        #: (prepare, process, on_finished): what the worker processes call.
        self.plain_handlers: dict[str, Callable[[Any], Any]] = {}
        # As declared, made async (plain ones run in threads: herder.kinds.plain).
        self._prepare: Callable[[JobContext], AsyncIterator[JSON]] | None = None
        self._process: Callable[[TaskContext], Awaitable[JSON]] | None = None
        self._on_finished: Callable[[FinishedJob], Awaitable[None]] | None = None
        _REGISTRY[name] = self

    def prepare(self, fn: _Prepare) -> _Prepare:
        if self._in_processes(fn, "prepare", required=False):
            from herder.kinds import processes  # it imports this module

            self._prepare = functools.partial(processes.prepare, self.name)
        else:
            self._prepare = plain.as_async_iterator(fn)
        return fn

    def process(self, fn: _Process) -> _Process:
        if self._in_processes(fn, "process", required=True):
            from herder.kinds import processes

            self._process = functools.partial(processes.run, self.name)
        else:
            self._process = plain.as_async(fn, executor=True)
        return fn

    def on_finished(self, fn: _Finished) -> _Finished:
        if self._in_processes(fn, "on_finished", required=False):
            from herder.kinds import processes

            self._on_finished = functools.partial(processes.on_finished, self.name)
        else:
            self._on_finished = plain.as_async(fn)
        return fn

    def _in_processes(self, fn: Callable[..., Any], handler: str, *, required: bool) -> bool:
        """Whether ``fn`` runs in worker processes: a plain handler of an
        executor="process" kind (an async prepare or on_finished stays on the event
        loop; an async process is refused, since it is what the executor is for)."""
        if self.executor != "process":
            return False
        if plain.is_async(fn):
            if required:
                raise KindError(
                    f"kind {self.name!r}: executor='process' runs plain functions, and "
                    f"{getattr(fn, '__name__', fn)!r} is async"
                )
            return False
        self.plain_handlers[handler] = fn
        return True

    @property
    def prepare_fn(self) -> Callable[[JobContext], AsyncIterator[JSON]]:
        return _job_as_one_task if self._prepare is None else self._prepare

    @property
    def process_fn(self) -> Callable[[TaskContext], Awaitable[JSON]]:
        if self._process is None:
            raise KindError(f"kind {self.name!r} has no process function")
        return self._process

    @property
    def on_finished_fn(self) -> Callable[[FinishedJob], Awaitable[None]] | None:
        return self._on_finished

    def retry_delay(self, attempt: int) -> float:
        """Exponential backoff with jitter: about backoff * 2**(attempt-1), capped."""
        ceiling = min(self.max_backoff, self.backoff * 2 ** max(0, attempt - 1))
        return random.uniform(ceiling / 2, ceiling)

    def __repr__(self) -> str:
        return f"Kind({self.name!r})"


def check_kinds() -> None:
    """Refuse, at start-up, a kind that could never run a task."""
    for kind in _REGISTRY.values():
        if kind._process is None:
            raise KindError(
                f"kind {kind.name!r} has no process function (declare one with the "
                "kind's @process decorator)"
            )


def runs_finish_hook(name: str) -> bool:
    """Whether a settlement of this kind needs an on_finished run: yes unless this daemon
    knows the kind and it has no hook (a kind served elsewhere may have one)."""
    kind = _REGISTRY.get(name)
    return kind is None or kind.on_finished_fn is not None


def get_kind(name: str) -> Kind | None:
    return _REGISTRY.get(name)


def known_kinds() -> list[str]:
    return sorted(_REGISTRY)


def unregister(name: str) -> None:
    """Forget a kind (tests declare throwaway kinds)."""
    _REGISTRY.pop(name, None)


def load_app(module: str) -> None:
    """Import a user module so that the kinds it declares register themselves.

    The working directory is importable, as with ``python -m``: ``herder run --app
    examples.documents`` works from the project root.
    """
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise KindError(f"cannot import app module {module!r}: {exc}") from exc
