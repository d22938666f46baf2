"""The speed issue's regression guard: the benchmark's herder code paths at volume (batched
claims, batched completions, COPY preparation, settlement), checked for correctness, never
for time. ``make bench`` measures; this only proves the fast paths stay right."""

from __future__ import annotations

from herder import db
from tests.support import running_daemon, wait_finished

TASKS = 20_000


async def test_twenty_thousand_noop_tasks_each_succeed_exactly_once(
    db_url: str, conn: db.Connection
) -> None:
    async with running_daemon(db_url):
        job_id: int = await conn.fetchval(
            "INSERT INTO herder.jobs (kind, payload) VALUES ('synthetic', $1) RETURNING id",
            {"tasks": TASKS},
        )
        job = await wait_finished(conn, job_id, timeout=120)

    assert job["status"] == "SUCCESS", job["message"]
    assert job["prepared_at"] is not None
    assert job["started_at"] is not None and job["ended_at"] is not None
    tasks = await conn.fetchrow(
        """
        SELECT count(*) AS total,
               count(DISTINCT seq) AS distinct_seq,
               min(seq) AS first_seq,
               max(seq) AS last_seq,
               count(*) FILTER (WHERE status = 'SUCCESS') AS success,
               count(*) FILTER (WHERE attempts = 1) AS first_attempt,
               count(*) FILTER (WHERE started_at IS NULL OR ended_at IS NULL
                                OR ended_at < started_at) AS bad_times,
               count(*) FILTER (WHERE worker IS NOT NULL OR lease_until IS NOT NULL) AS held,
               count(*) FILTER (WHERE started_at < $2 OR ended_at > $3) AS outside_job
        FROM herder.tasks WHERE job_id = $1
        """,
        job_id,
        job["prepared_at"],
        job["ended_at"],
    )
    assert tasks is not None
    assert dict(tasks) == {
        "total": TASKS,
        "distinct_seq": TASKS,
        "first_seq": 0,
        "last_seq": TASKS - 1,
        "success": TASKS,
        "first_attempt": TASKS,
        "bad_times": 0,
        "held": 0,
        "outside_job": 0,
    }
    progress = await conn.fetchrow("SELECT * FROM herder.job_progress WHERE job_id = $1", job_id)
    assert progress is not None
    assert (progress["total"], progress["success"]) == (TASKS, TASKS)
    assert progress["pending"] == progress["in_progress"] == progress["failure"] == 0
