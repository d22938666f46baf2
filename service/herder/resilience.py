"""Keep a loop alive across database outages: the daemon never exits because PostgreSQL
went away for a while."""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import asyncpg
import structlog

from herder.errors import innermost

log = structlog.get_logger("herder")
T = TypeVar("T")

#: Errors that say "the database is unreachable or busy right now", not "this is wrong".
TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,  # includes TimeoutError and refused connections
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, pg_terminate_backend
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.InsufficientResourcesError,
    # statement_timeout and lock_timeout, from a role's or the server's settings.
    asyncpg.exceptions.QueryCanceledError,
    asyncpg.exceptions.LockNotAvailableError,
    # A pool connection whose session the server ended mid-operation is left in a broken
    # protocol state (MagicStack/asyncpg#784, #1069); the pool drops it when it fails to
    # reset on release, so the next attempt gets a fresh connection.
    asyncpg.exceptions.InternalClientError,
)


class Backoff:
    """Waits that double from ``first`` up to ``cap`` seconds, each drawn from half to one
    and a half times the current step, so that daemons which lost the database together
    do not come back in step."""

    def __init__(self, first: float, cap: float) -> None:
        self.first = first
        self.cap = cap
        self.step = first

    async def wait(self) -> None:
        await anyio.sleep(self.step * random.uniform(0.5, 1.5))
        self.step = min(self.step * 2, self.cap)

    def reset(self) -> None:
        self.step = self.first


def is_transient(exc: BaseException) -> bool:
    """A transient error, or a group of nothing else: a task group wraps what its body
    and its tasks raise, so the coordinator's claim failing arrives as a group."""
    if isinstance(exc, BaseExceptionGroup):
        return all(is_transient(e) for e in exc.exceptions)
    return isinstance(exc, TRANSIENT)


async def supervise(name: str, loop: Callable[[], Awaitable[None]]) -> None:
    """Run ``loop``; when it raises, back off with jitter and run it again.

    A transient error is the database being away. Anything else is a bug or something no
    one foresaw: it is logged with its traceback, and the loop starts again all the same,
    because a daemon exits only on SIGTERM or SIGINT; the backoff keeps a
    loop that fails at once from spinning.
    """
    backoff = Backoff(0.05, 5.0)
    while True:
        started = time.monotonic()
        try:
            await loop()
            return
        except Exception as exc:
            first = innermost(exc)
            if time.monotonic() - started > 30:
                backoff.reset()
            error = f"{type(first).__name__}: {first}"
            if is_transient(exc):
                log.warning("database error; retrying", loop=name, error=error)
            else:
                log.error("unexpected error; restarting", loop=name, error=error, exc_info=exc)
            await backoff.wait()


async def retrying(
    what: str, step: Callable[[], Awaitable[T]], *, timeout: float | None = None
) -> T | None:
    """Run ``step`` until it succeeds, backing off between tries, for up to ``timeout``
    seconds; None when it never did. For writes that must not be dropped on one error (a
    hook's done-write, the hand-back at shutdown): each is fenced, so trying again is
    safe."""
    backoff = Backoff(0.05, 2.0)
    with anyio.move_on_after(timeout):
        while True:
            try:
                return await step()
            except Exception as exc:
                log.warning(
                    "write failed; retrying", what=what, error=f"{type(exc).__name__}: {exc}"
                )
            await backoff.wait()
    log.error("gave up", what=what, after_seconds=timeout)
    return None


async def keep_renewing(name: str, renew: Callable[[], Awaitable[bool]], interval: float) -> None:
    """Call ``renew`` every ``interval`` seconds while the caller's work runs. When it
    fails, or answers False (something was not renewed and may be next time), try again
    soon: a lease must survive a few seconds of trouble, not only the next interval."""
    retry = max(0.05, min(1.0, interval / 3))
    wait = interval
    while True:
        await anyio.sleep(wait)
        try:
            wait = interval if await renew() else retry
        except Exception as exc:
            log.warning("lease renewal failed; retrying", leases=name, error=str(exc))
            wait = retry
