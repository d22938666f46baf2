"""LISTEN on a dedicated connection. Notifications only wake loops that re-query; a lost
notification costs at most one poll interval, and every reconnect wakes everything."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import asyncpg
import structlog

from herder import db
from herder.resilience import TRANSIENT, Backoff

log = structlog.get_logger("herder.listener")

# The channels herder's SQL notifies (by these literal names: tests/test_schema.py checks
# that the two agree). A notification is a wake-up only: its payload is never read.
#: Jobs were inserted, resumed or retried: preparations to claim, controls to carry out.
JOBS = "herder_jobs"
#: Tasks became claimable.
TASKS = "herder_tasks"
#: A job was canceled or restarted: its running tasks must stop.
CANCEL = "herder_cancel"
#: A job settled: an on_finished hook may be due.
JOB_FINISHED = "herder_job_finished"
CHANNELS = (JOBS, TASKS, CANCEL, JOB_FINISHED)

Handler = Callable[[str, str], None]

# The listener only wakes loops that also poll: whatever stops it from listening (the
# database refusing connections, a role's rights changing) is retried, never fatal.
_RETRY: tuple[type[BaseException], ...] = (*TRANSIENT, asyncpg.PostgresError)


class Listener:
    def __init__(self, url: str, on_notify: Handler, on_reconnect: Callable[[], None]) -> None:
        self.url = url
        self.on_notify = on_notify
        self.on_reconnect = on_reconnect
        self.connected = False
        self.reconnects = 0

    async def run(self) -> None:
        backoff = Backoff(0.1, 5.0)
        while True:
            lost = anyio.Event()
            try:
                conn = await db.connect(self.url)
            except _RETRY as exc:
                log.warning("listener cannot connect", error=str(exc))
                await backoff.wait()
                continue
            try:
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                for channel in CHANNELS:
                    await conn.add_listener(channel, self._dispatch)
                self.connected = True
                backoff.reset()
                log.info("listening", channels=list(CHANNELS))
                # Anything committed while we were away was not notified: re-query now.
                self.on_reconnect()
                await self._watch(conn, lost)
            except _RETRY as exc:
                log.warning("listener connection failed", error=str(exc))
            finally:
                self.connected = False
                with anyio.CancelScope(shield=True):
                    await _close_quietly(conn)
            self.reconnects += 1
            log.warning("listener disconnected; reconnecting")

    async def _watch(self, conn: db.Connection, lost: anyio.Event) -> None:
        """Return when the connection is gone. A termination callback does not fire on
        every kind of network loss, so a cheap query checks now and then."""
        while not lost.is_set():
            with anyio.move_on_after(2.0):
                await lost.wait()
            if lost.is_set() or conn.is_closed():
                return
            with anyio.fail_after(5.0):
                await conn.fetchval("SELECT 1")

    def _dispatch(self, _conn: object, _pid: int, channel: str, payload: object) -> None:
        self.on_notify(channel, str(payload))


async def _close_quietly(conn: db.Connection) -> None:
    try:
        with anyio.move_on_after(1.0):
            await conn.close()
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        conn.terminate()
