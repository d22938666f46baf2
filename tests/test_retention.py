"""Retention: finished jobs older than the retention go, in small batches, with their
tasks; nothing unfinished, recent or with a pending on_finished hook is touched."""

from __future__ import annotations

import json
import os
import sys

import anyio

from herder import db
from herder.store import Store

DAY = 86400.0


async def make_job(
    conn: db.Connection, status: str, age_days: float, tasks: int, **extra: bool
) -> int:
    job_id: int = await conn.fetchval(
        "INSERT INTO herder.jobs (kind, status, ended_at) "
        "VALUES ('synthetic', $1, CASE WHEN $1 IN ('SUCCESS', 'WARNING', 'FAILURE', 'CANCELED') "
        "THEN clock_timestamp() - make_interval(days => $2) END) RETURNING id",
        status,
        age_days,
    )
    if extra.get("hook_pending"):
        await conn.execute(
            "INSERT INTO herder.finish_hooks (job_id, status) VALUES ($1, $2)", job_id, status
        )
    await conn.execute(
        "INSERT INTO herder.tasks (job_id, seq, status) SELECT $1, i, 'SUCCESS' "
        "FROM generate_series(1, $2) i",
        job_id,
        tasks,
    )
    return job_id


async def test_prune_deletes_only_old_finished_jobs_in_batches(
    store: Store, conn: db.Connection
) -> None:
    old = [await make_job(conn, status, 40, 120) for status in ("SUCCESS", "FAILURE", "CANCELED")]
    keep = [
        await make_job(conn, "SUCCESS", 10, 5),  # recent
        await make_job(conn, "IN_PROGRESS", 40, 5),  # not finished (no ended_at)
        await make_job(conn, "WARNING", 40, 5, hook_pending=True),  # hook not run yet
    ]
    jobs, tasks = await store.prune(30 * DAY, jobs_per_batch=2, tasks_per_batch=50)
    assert (jobs, tasks) == (3, 360)
    remaining = await conn.fetchval("SELECT array_agg(id ORDER BY id) FROM herder.jobs")
    assert remaining == keep
    assert await conn.fetchval("SELECT count(*) FROM herder.tasks") == 15
    assert not set(old) & set(remaining)
    assert await store.prune(30 * DAY) == (0, 0)


async def test_herder_prune_from_the_cli(db_url: str, conn: db.Connection) -> None:
    await make_job(conn, "SUCCESS", 3, 7)
    await make_job(conn, "SUCCESS", 0.5, 7)
    result = await anyio.run_process(
        [sys.executable, "-m", "herder", "prune", "--retention", "2d", "--json"],
        env={**os.environ, "DATABASE_URL": db_url},
    )
    assert json.loads(result.stdout) == {"jobs_deleted": 1, "tasks_deleted": 7}
    assert await conn.fetchval("SELECT count(*) FROM herder.jobs") == 1
