"""Nothing lost: daemons killed, frozen, stopped; PostgreSQL restarted; connections cut.

Every test runs ``herder run`` processes against a private PostgreSQL it may break, and
checks the outcome from the database.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import aiohttp
import asyncpg
import pytest

from herder import db
from tests.private_pg import PrivatePostgres, free_port
from tests.support import DaemonProcess, job_row, submit, wait_finished, wait_for

FAST = ("--lease-seconds", "1", "--poll-interval", "0.2", "--health-addr", "127.0.0.1:0")

START_LOG = """
CREATE TABLE public.starts (task_id bigint, worker text, job_status text);
CREATE FUNCTION public.log_start() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.starts
    SELECT NEW.id, NEW.worker, status FROM herder.jobs WHERE id = NEW.job_id;
    RETURN NEW;
END $$;
CREATE TRIGGER log_start BEFORE UPDATE ON herder.tasks FOR EACH ROW
    WHEN (NEW.status = 'IN_PROGRESS' AND OLD.status <> 'IN_PROGRESS')
    EXECUTE FUNCTION public.log_start();
CREATE TABLE public.preparations (job_id bigint, preparer text);
CREATE FUNCTION public.log_preparation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.preparations VALUES (NEW.id, NEW.preparer);
    RETURN NEW;
END $$;
CREATE TRIGGER log_preparation AFTER UPDATE OF preparer ON herder.jobs FOR EACH ROW
    WHEN (NEW.preparer IS NOT NULL AND NEW.preparer IS DISTINCT FROM OLD.preparer)
    EXECUTE FUNCTION public.log_preparation();
"""

Daemons = Callable[..., DaemonProcess]


async def count(conn: db.Connection, where: str, job_id: int) -> int:
    n: int = await conn.fetchval(
        f"SELECT count(*) FROM herder.tasks WHERE job_id = $1 AND {where}", job_id
    )
    return n


async def assert_all_succeeded_once_each(conn: db.Connection, job_id: int, tasks: int) -> None:
    row = await conn.fetchrow(
        "SELECT count(*) AS n, count(DISTINCT seq) AS seqs, "
        "count(*) FILTER (WHERE status = 'SUCCESS') AS ok FROM herder.tasks WHERE job_id = $1",
        job_id,
    )
    assert row is not None
    assert dict(row) == {"n": tasks, "seqs": tasks, "ok": tasks}


async def test_kill_9_mid_preparation_and_mid_job_loses_and_duplicates_nothing(
    private_db_url: str, daemons: Daemons
) -> None:
    conn = await db.connect(private_db_url)
    try:
        job_id = await submit(conn, "synthetic", {"tasks": 4000, "prepare_ms": 0.5, "task_ms": 3})
        kills = 0
        first = daemons(private_db_url, *FAST, "--concurrency", "20")
        await first.ready()
        await wait_for(lambda: count(conn, "true", job_id), what="the first batch of tasks")
        assert (await job_row(conn, job_id))["status"] == "PREPARING"
        await first.kill()
        kills += 1
        recoveries: list[float] = []
        for _ in range(2):
            done_before = await count(conn, "status = 'SUCCESS'", job_id)
            killed_at = time.monotonic()
            daemon = daemons(private_db_url, *FAST, "--concurrency", "20")
            await daemon.ready()

            async def progressed(before: int = done_before) -> bool:
                return await count(conn, "status = 'SUCCESS'", job_id) > before + 200

            await wait_for(progressed, what="progress after a restart")
            recoveries.append(time.monotonic() - killed_at)
            await daemon.kill()
            kills += 1
        last = daemons(private_db_url, *FAST, "--concurrency", "20")
        job = await wait_finished(conn, job_id, timeout=60)
        last.signal(signal.SIGTERM)
        assert await last.exited() == 0
        assert job["status"] == "SUCCESS"
        await assert_all_succeeded_once_each(conn, job_id, 4000)
        # Only the two mid-job kills could interrupt tasks, so none started more than 3 times.
        assert await conn.fetchval("SELECT max(attempts) FROM herder.tasks") <= 3
        assert max(recoveries) < 15
    finally:
        await conn.close()


async def test_a_frozen_worker_that_lost_its_lease_finishes_late_and_is_ignored(
    private_db_url: str, daemons: Daemons
) -> None:
    conn = await db.connect(private_db_url)
    try:
        frozen = daemons(private_db_url, *FAST)
        await frozen.ready()
        job_id = await submit(conn, "synthetic", {"tasks": 1, "task_ms": 1500})
        await wait_for(
            lambda: count(conn, "status = 'IN_PROGRESS'", job_id), what="the task to start"
        )
        frozen.signal(signal.SIGSTOP)  # a stalled host: no heartbeats, no completion
        rescuer = daemons(private_db_url, *FAST)
        job = await wait_finished(conn, job_id, timeout=30)
        task = await conn.fetchrow("SELECT * FROM herder.tasks WHERE job_id = $1", job_id)
        assert task is not None
        assert (task["status"], task["attempts"]) == ("SUCCESS", 2)
        frozen.signal(signal.SIGCONT)

        async def discarded() -> bool:
            return "discarded stale outcomes" in frozen.log

        await wait_for(discarded, what="the frozen worker's late outcome")
        after = await conn.fetchrow("SELECT * FROM herder.tasks WHERE job_id = $1", job_id)
        assert after == task  # the late result changed nothing
        assert (await job_row(conn, job_id))["ended_at"] == job["ended_at"]
        for daemon in (frozen, rescuer):
            daemon.signal(signal.SIGTERM)
            assert await daemon.exited() == 0
    finally:
        await conn.close()


@pytest.mark.parametrize("how", ["restart_fast", "crash_immediate", "terminate_backends"])
async def test_database_outage_under_a_running_job(
    private_pg: PrivatePostgres, private_db_url: str, daemons: Daemons, how: str
) -> None:
    """The daemon rides out the outage, finishes the job, and its listener is back: with
    the poll at 30 s, a job inserted afterwards starts within milliseconds."""
    conn = await db.connect(private_db_url)
    job_id = await submit(conn, "synthetic", {"tasks": 3000, "task_ms": 10})
    daemon = daemons(
        private_db_url,
        "--poll-interval",
        "30",
        "--lease-seconds",
        "5",
        "--health-addr",
        "127.0.0.1:0",
    )
    await daemon.ready()
    await wait_for(lambda: count(conn, "status = 'SUCCESS'", job_id), what="the job to run")
    assert (await job_row(conn, job_id))["status"] == "IN_PROGRESS"
    if how == "terminate_backends":
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    else:
        await conn.close()
        private_pg.stop("fast" if how == "restart_fast" else "immediate")
        private_pg.start()
        conn = await db.connect(private_db_url)
    try:
        job = await wait_finished(conn, job_id, timeout=60)
        assert job["status"] == "SUCCESS"
        await assert_all_succeeded_once_each(conn, job_id, 3000)

        async def listening_again() -> bool:
            return daemon.log.count('"listening"') >= 2

        await wait_for(listening_again, what="the listener to reconnect")
        latest = await submit(conn, "synthetic", {"tasks": 1})
        started = await wait_for(
            lambda: conn.fetchval(
                "SELECT t.started_at - j.created_at FROM herder.tasks t "
                "JOIN herder.jobs j ON j.id = t.job_id "
                "WHERE j.id = $1 AND t.started_at IS NOT NULL",
                latest,
            ),
            timeout=10,
            what="the new job's task to start",
        )
        assert started.total_seconds() < 1.0
        daemon.signal(signal.SIGTERM)
        assert await daemon.exited() == 0
    finally:
        await conn.close()


async def test_sigterm_lets_running_tasks_finish_and_hands_back_the_rest(
    private_db_url: str, daemons: Daemons
) -> None:
    conn = await db.connect(private_db_url)
    try:
        port = free_port()
        daemon = daemons(
            private_db_url,
            *FAST,
            "--concurrency", "4",
            "--shutdown-timeout", "20",
            "--health-addr", f"127.0.0.1:{port}",
        )  # fmt: skip
        await daemon.ready()
        job_id = await submit(conn, "synthetic", {"tasks": 20, "task_ms": 1500})

        # Four run; the daemon has prefetched (claimed) the other sixteen.
        async def four_running() -> bool:
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{port}/healthz") as response,
            ):
                return bool((await response.json())["running_tasks"] == 4)

        await wait_for(four_running, what="four running tasks")
        daemon.signal(signal.SIGTERM)
        assert await daemon.exited() == 0
        statuses = await conn.fetch(
            "SELECT status, attempts, worker IS NULL AS free, count(*) FROM herder.tasks "
            "WHERE job_id = $1 GROUP BY 1, 2, 3 ORDER BY 1",
            job_id,
        )
        assert [tuple(r) for r in statuses] == [("PENDING", 0, True, 16), ("SUCCESS", 1, True, 4)]
    finally:
        await conn.close()


async def test_sigterm_past_the_shutdown_timeout_cancels_and_spends_no_attempt(
    private_db_url: str, daemons: Daemons
) -> None:
    conn = await db.connect(private_db_url)
    try:
        daemon = daemons(private_db_url, *FAST, "--concurrency", "2", "--shutdown-timeout", "0.5")
        await daemon.ready()
        job_id = await submit(conn, "synthetic", {"tasks": 2, "task_ms": 60_000})
        await wait_for(lambda: count(conn, "status = 'IN_PROGRESS'", job_id), what="claims")
        stopped_at = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert await daemon.exited() == 0
        assert time.monotonic() - stopped_at < 10
        rows = await conn.fetch("SELECT status, attempts, started_at FROM herder.tasks")
        assert [(r["status"], r["attempts"], r["started_at"]) for r in rows] == [
            ("PENDING", 0, None)
        ] * 2
    finally:
        await conn.close()


async def test_three_daemons_share_the_work_and_run_each_task_once(
    private_db_url: str, daemons: Daemons
) -> None:
    conn = await db.connect(private_db_url)
    try:
        await conn.execute(START_LOG)
        fleet = [
            daemons(private_db_url, *FAST, "--concurrency", "8", "--prefetch", "16")
            for _ in range(3)
        ]
        for daemon in fleet:
            await daemon.ready()
        jobs = [await submit(conn, "synthetic", {"tasks": 300, "task_ms": 2}) for _ in range(8)]
        for job_id in jobs:
            assert (await wait_finished(conn, job_id, timeout=60))["status"] == "SUCCESS"
        starts = await conn.fetch(
            "SELECT task_id, count(*) AS n FROM public.starts GROUP BY task_id"
        )
        assert len(starts) == 8 * 300
        assert {r["n"] for r in starts} == {1}
        assert (
            await conn.fetchval("SELECT count(*) FROM public.starts WHERE job_status = 'PREPARING'")
            == 0
        )
        prepared = await conn.fetch(
            "SELECT job_id, count(*) AS n FROM public.preparations GROUP BY job_id"
        )
        assert sorted(r["job_id"] for r in prepared) == jobs
        assert {r["n"] for r in prepared} == {1}
        busy = await conn.fetchval("SELECT count(DISTINCT worker) FROM public.starts")
        assert busy == 3, "every daemon ran tasks"
        for daemon in fleet:
            daemon.signal(signal.SIGTERM)
        for daemon in fleet:
            assert await daemon.exited() == 0
    finally:
        await conn.close()


async def test_a_daemon_restarted_under_its_name_rescues_what_it_ran_before(
    private_db_url: str, daemons: Daemons
) -> None:
    """A daemon never takes over its own expired leases (it may only be slow to renew
    them), so a crashed daemon started again with the same --name must recognise the
    tasks its previous process held: they started before it did."""
    conn = await db.connect(private_db_url)
    try:
        first = daemons(private_db_url, *FAST, "--name", "web-1")
        await first.ready()
        job_id = await submit(conn, "synthetic", {"tasks": 1, "task_ms": 60_000})
        await wait_for(
            lambda: count(conn, "status = 'IN_PROGRESS'", job_id), what="the task to start"
        )
        await first.kill()
        again = daemons(private_db_url, *FAST, "--name", "web-1")
        await again.ready()

        async def second_attempt() -> asyncpg.Record | None:
            row: asyncpg.Record | None = await conn.fetchrow(
                "SELECT status, attempts, worker, message FROM herder.tasks WHERE job_id = $1",
                job_id,
            )
            return row if row is not None and row["attempts"] == 2 else None

        row = await wait_for(second_attempt, timeout=20, what="the task to run again")
        assert (row["status"], row["worker"]) == ("IN_PROGRESS", "web-1")
        assert row["message"] == "worker lost on attempt 1 (web-1, restarted)"
        await conn.execute("SELECT herder.cancel_job($1)", job_id)  # not another minute
        again.signal(signal.SIGTERM)
        assert await again.exited() == 0
    finally:
        await conn.close()
