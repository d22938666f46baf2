"""Helpers shared by the tests: a daemon in the test's own task group, and waiting for a
condition with a deadline (tests never sleep and hope)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import anyio

import herder
from herder import db
from herder.daemon import Daemon, DaemonConfig
from herder.kinds import Kind

T = TypeVar("T")

FINISHED = ("SUCCESS", "WARNING", "FAILURE", "CANCELED")


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


async def wait_for(
    probe: Callable[[], Awaitable[T | None]],
    *,
    timeout: float = 20.0,
    interval: float = 0.02,
    what: str = "condition",
) -> T:
    """Call ``probe`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {value!r})")
        await anyio.sleep(interval)


@asynccontextmanager
async def running_daemon(url: str, **config: Any) -> AsyncIterator[Daemon]:
    """A daemon serving ``url`` until the block ends, then shut down gracefully."""
    config.setdefault("poll_interval", 0.2)
    config.setdefault("shutdown_timeout", 5.0)
    daemon = Daemon(DaemonConfig(database_url=url, **config))
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.run)
        try:
            yield daemon
        finally:
            daemon.request_stop()


async def job_row(conn: db.Connection, job_id: int) -> dict[str, Any]:
    row = await conn.fetchrow("SELECT * FROM herder.jobs WHERE id = $1", job_id)
    assert row is not None, f"job {job_id} does not exist"
    return dict(row)


async def wait_finished(conn: db.Connection, job_id: int, timeout: float = 30.0) -> dict[str, Any]:
    """Wait until the job has settled; return its row."""

    async def finished() -> dict[str, Any] | None:
        row = await job_row(conn, job_id)
        return row if row["status"] in FINISHED else None

    return await wait_for(finished, timeout=timeout, what=f"job {job_id} to settle")


async def submit(conn: db.Connection, kind: str, payload: Any, *, priority: int = 0) -> int:
    """Submit as a psql user would: one INSERT."""
    job_id: int = await conn.fetchval(
        "INSERT INTO herder.jobs (kind, payload, priority) VALUES ($1, $2, $3) RETURNING id",
        kind,
        payload,
        priority,
    )
    return job_id


def one_task_per_item(kind: Kind) -> None:
    """Give a test kind a prepare that yields each of the payload's items."""

    @kind.prepare
    async def prepare(job: herder.JobContext) -> AsyncIterator[herder.JSON]:
        for item in job.payload["items"]:
            yield item


async def tasks_of(conn: db.Connection, job_id: int) -> list[dict[str, Any]]:
    rows = await conn.fetch("SELECT * FROM herder.tasks WHERE job_id = $1 ORDER BY seq", job_id)
    return [dict(r) for r in rows]
