"""Keep a loop alive across database outages: the daemon never exits because PostgreSQL
went away for a while."""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable

import anyio
import asyncpg
import structlog

log = structlog.get_logger("herder")

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
    # A pool connection whose session the server ended mid-operation is left in a broken
    # protocol state (MagicStack/asyncpg#784, #1069); the pool drops it when it fails to
    # reset on release, so the next attempt gets a fresh connection.
    asyncpg.exceptions.InternalClientError,
)


def is_transient(exc: BaseException) -> bool:
    """A transient error, or a group of nothing else: a task group wraps what its body
    and its tasks raise, so the coordinator's claim failing arrives as a group."""
    if isinstance(exc, BaseExceptionGroup):
        return all(is_transient(e) for e in exc.exceptions)
    return isinstance(exc, TRANSIENT)


async def supervise(name: str, loop: Callable[[], Awaitable[None]]) -> None:
    """Run ``loop``; on a transient error, back off with jitter and run it again."""
    delay = 0.05
    while True:
        started = time.monotonic()
        try:
            await loop()
            return
        except Exception as exc:
            if not is_transient(exc):
                raise
            first: BaseException = exc
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            if time.monotonic() - started > 30:
                delay = 0.05
            log.warning(
                "database error; retrying", loop=name, error=f"{type(first).__name__}: {first}"
            )
            await anyio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 5.0)
