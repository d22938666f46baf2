"""Helpers shared by the tests: a daemon in the test's own task group, and waiting for a
condition with a deadline (tests never sleep and hope)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import anyio

import herder
from herder import db
from herder.daemon import Daemon, DaemonConfig
from herder.kinds import Kind
from herder.states import JOB_FINISHED

T = TypeVar("T")


#: The ``login`` fixture: ``await login("herder_submitter")`` -> (role name, connection).
Login = Callable[..., Awaitable[tuple[str, db.Connection]]]


def as_role(url: str, role: str) -> str:
    """``url`` logging in as ``role`` (the test roles' password is 'secret')."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{role}:secret@{host}"))


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


@asynccontextmanager
async def cloned_database(server_url: str, name: str, template: str) -> AsyncIterator[str]:
    """A database ``name`` cloned from ``template`` (dropped first if a crashed run left
    it), its URL, and dropped afterwards."""
    admin = await db.connect(server_url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
        yield with_database(server_url, name)
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


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
    config.setdefault("health_addr", "127.0.0.1:0")  # any free port: daemons run side by side
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
        return row if row["status"] in JOB_FINISHED else None

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


class DaemonProcess:
    """``herder run`` as a real process, so tests can kill -9 it, stop it with SIGTERM, or
    freeze it with SIGSTOP. Its log (JSON lines) goes to a file the test can read."""

    def __init__(self, url: str, log_dir: Path, *args: str) -> None:
        self.log_path = log_dir / f"daemon-{next(_daemon_numbers)}.log"
        self._log = self.log_path.open("wb")
        env = {**os.environ, "DATABASE_URL": url}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "herder", "run", *args],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def ready(self, timeout: float = 30.0) -> None:
        async def serving() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited early ({self.proc.returncode}):\n{self.log}")
            return '"serving"' in self.log

        await wait_for(serving, timeout=timeout, what="the daemon to serve")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    async def exited(self, timeout: float = 30.0) -> int:
        async def gone() -> bool:
            return self.proc.poll() is not None

        await wait_for(gone, timeout=timeout, what="the daemon to exit")
        self._log.close()
        return self.proc.returncode

    async def kill(self) -> None:
        self.proc.kill()  # SIGKILL: no shutdown code runs
        await self.exited()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


_daemon_numbers = itertools.count()
