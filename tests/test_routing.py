"""Routing by kind: a daemon claims only the jobs and tasks of the kinds it serves; a job
of a kind no live daemon serves waits in PREPARING, saying so; herder.daemons and
`herder fleet` show the fleet."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import Any

import anyio
import asyncpg
import pytest

from herder import db
from tests.support import DaemonProcess, submit, wait_finished, wait_for

FAST = ("--lease-seconds", "1", "--poll-interval", "0.2", "--health-addr", "127.0.0.1:0")

Daemons = Callable[..., DaemonProcess]


async def test_a_mixed_fleet_runs_every_job_on_a_daemon_that_serves_its_kind(
    private_db_url: str, daemons: Daemons
) -> None:
    conn = await db.connect(private_db_url)
    try:
        search = daemons(private_db_url, *FAST, "--app", "tests.routing_search", "--name", "a")
        llm = daemons(private_db_url, *FAST, "--app", "tests.routing_llm", "--name", "b")
        await search.ready()
        await llm.ready()
        jobs = {}
        for i in range(6):
            kind = "search" if i % 2 else "llm"
            jobs[await submit(conn, kind, {"i": i})] = kind
        for job_id in jobs:
            assert (await wait_finished(conn, job_id))["status"] == "SUCCESS"
        rows = await conn.fetch(
            "SELECT j.kind, t.result, t.attempts FROM herder.tasks t "
            "JOIN herder.jobs j ON j.id = t.job_id WHERE j.id = ANY($1::bigint[])",
            list(jobs),
        )
        ran_on = {(r["kind"], r["result"]["pid"]) for r in rows}
        assert ran_on == {("llm", llm.proc.pid), ("search", search.proc.pid)}
        assert {r["attempts"] for r in rows} == {1}  # none failed for want of its kind
        fleet = await conn.fetch("SELECT name, kinds FROM herder.daemons ORDER BY name")
        assert [(r["name"], sorted(r["kinds"])) for r in fleet] == [
            ("a", ["search", "synthetic"]),
            ("b", ["llm", "synthetic"]),
        ]
        done = await anyio.run_process(
            [sys.executable, "-m", "herder", "fleet", "--database-url", private_db_url]
        )
        out = done.stdout.decode()
        assert "search, synthetic" in out and "llm, synthetic" in out

        await llm.kill()  # a dead daemon's row goes within its lease

        async def gone() -> bool:
            names = [r["name"] for r in await conn.fetch("SELECT name FROM herder.daemons")]
            return names == ["a"]

        await wait_for(gone, timeout=10, what="the dead daemon's row to go")
        search.signal(signal.SIGTERM)
        assert await search.exited() == 0
        assert await conn.fetchval("SELECT count(*) FROM herder.daemons") == 0
    finally:
        await conn.close()


async def test_a_job_no_daemon_serves_waits_saying_so_and_runs_when_one_starts(
    private_db_url: str, daemons: Daemons
) -> None:
    conn = await db.connect(private_db_url)
    try:
        search = daemons(private_db_url, *FAST, "--app", "tests.routing_search")
        await search.ready()
        job_id = await submit(conn, "ocr", {})

        async def waiting() -> Any:
            row = await conn.fetchrow(
                "SELECT status, message FROM herder.jobs WHERE id = $1", job_id
            )
            return row if row is not None and row["message"] is not None else None

        row = await wait_for(waiting, timeout=10, what="the job to say it waits")
        assert (row["status"], row["message"]) == (
            "PREPARING",
            "waiting: no live daemon serves kind 'ocr'",
        )
        ocr = daemons(private_db_url, *FAST, "--app", "tests.routing_ocr")
        job = await wait_finished(conn, job_id)
        assert (job["status"], job["message"]) == ("SUCCESS", "1 of 1 tasks succeeded")
        for daemon in (search, ocr):
            daemon.signal(signal.SIGTERM)
            assert await daemon.exited() == 0
    finally:
        await conn.close()


@pytest.mark.parametrize("kind", ["", "line\nbreak", "bell\x07", "k" * 201])
async def test_a_kind_that_is_not_a_name_is_refused_at_insert(
    conn: db.Connection, kind: str
) -> None:
    with pytest.raises(asyncpg.CheckViolationError, match="is not a kind name"):
        await conn.execute("INSERT INTO herder.jobs (kind) VALUES ($1)", kind)
