"""The history phase: a month of finished tasks must slow nothing.

On one database and one daemon: the workloads run on empty tables, then a history of
finished tasks is built, and they run again. Reported: each workload's rate before and
after, the many-small-jobs rate against one big job's, and what `herder show` of a job
costs (the queries the CLI runs) with the history in the table.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import anyio
from rich.progress import Progress

from bench.dbs import Server
from bench.herder_runs import PhaseTimeout, daemons
from bench.model import History
from bench.options import Options
from herder import db
from herder.states import JOB_FINISHED
from herder.store import Store

POLL = 0.1
#: Finished tasks per history job, and per statement while building it.
HISTORY_JOB_TASKS = 100_000
SHOW_SAMPLES = 50


async def history(server: Server, opts: Options, progress: Progress) -> History:
    url = await server.fresh_herder("herder_bench_history")
    conn = await db.connect(url)
    pool = await db.create_pool(url, min_size=1, max_size=2)
    store = Store(pool)
    try:
        async with daemons("history", url, opts):
            empty = await _workloads(conn, opts, progress, "empty tables")
            built = await _build_history(conn, opts.history_tasks, progress)
            after = await _workloads(conn, opts, progress, f"{opts.history_tasks:,} finished")
        show_big = await _show_ms(store, built)
        one_task = await conn.fetchval(
            "SELECT min(id) FROM herder.jobs WHERE id > $1 AND kind = 'synthetic'", built
        )
        show_small = await _show_ms(store, one_task)
        plan = await conn.fetch(
            "EXPLAIN SELECT * FROM herder.tasks WHERE job_id = $1 ORDER BY seq LIMIT 50", built
        )
    finally:
        await pool.close()
        await conn.close()
    return History(
        finished_tasks=opts.history_tasks,
        single_task_jobs=opts.history_single_jobs,
        single_rate_empty=empty["single"][0],
        single_rate_after=after["single"][0],
        one_job_rate_empty=empty["one_job"][0],
        one_job_rate_after=after["one_job"][0],
        many_jobs_rate_empty=empty["many_jobs"][0],
        many_jobs_rate_after=after["many_jobs"][0],
        one_job_settle_empty=empty["one_job"][1],
        one_job_settle_after=after["one_job"][1],
        many_jobs_settle_empty=empty["many_jobs"][1],
        many_jobs_settle_after=after["many_jobs"][1],
        many_jobs=opts.history_many_jobs,
        show_ms_big_job=show_big,
        show_ms_single_task_job=show_small,
        per_job_plan=[r[0] for r in plan],
    )


async def _workloads(
    conn: db.Connection, opts: Options, progress: Progress, label: str
) -> dict[str, tuple[float, float]]:
    single = await _run(
        conn,
        [{"tasks": 1}] * opts.history_single_jobs,
        progress,
        f"herder: {opts.history_single_jobs} single-task jobs, {label}",
        opts.timeout,
    )
    one_job = await _run(
        conn,
        [{"tasks": opts.history_spread_tasks}],
        progress,
        f"herder: {opts.history_spread_tasks:,} tasks in one job, {label}",
        opts.timeout,
    )
    per_job = opts.history_spread_tasks // opts.history_many_jobs
    many_jobs = await _run(
        conn,
        [{"tasks": per_job}] * opts.history_many_jobs,
        progress,
        f"herder: {opts.history_spread_tasks:,} tasks in {opts.history_many_jobs:,} jobs "
        f"of two owners, {label}",
        opts.timeout,
    )
    return {"single": single, "one_job": one_job, "many_jobs": many_jobs}


async def _run(
    conn: db.Connection,
    payloads: list[dict[str, Any]],
    progress: Progress,
    label: str,
    timeout: float,
) -> tuple[float, float]:
    """Submit the jobs in one statement (owners alternating between two roles' names)
    and wait for them; return tasks per second from the first task's start to the last
    one's end, and from the submission to the last settlement.

    The second charges every workload its preparation: a job's tasks cannot start
    before its preparation commits, so the first rate leaves one big job's preparation
    out, while the preparations of many small jobs overlap their tasks and count."""
    bar = progress.add_task(label, total=len(payloads))
    job_ids: list[int] = [
        r["id"]
        for r in await conn.fetch(
            "INSERT INTO herder.jobs (kind, payload, owner) "
            "SELECT 'synthetic', p, CASE WHEN n % 2 = 0 THEN 'alice' ELSE 'bob' END "
            "FROM unnest($1::jsonb[]) WITH ORDINALITY AS x(p, n) RETURNING id",
            payloads,
        )
    ]
    deadline = time.monotonic() + timeout
    # Nothing else inserts jobs meanwhile, so the ids form one range: the poll reads a
    # range of the (status, id) index instead of matching thousands of ids, which cost the
    # server 4 ms a poll at 5,000 jobs, time taken from the run it measures.
    first, last = min(job_ids), max(job_ids)
    while True:
        done = await conn.fetchval(
            "SELECT count(*) FROM herder.jobs WHERE status = ANY($3::text[]) "
            "AND id BETWEEN $1 AND $2",
            first,
            last,
            list(JOB_FINISHED),
        )
        progress.update(bar, completed=done)
        if done == len(job_ids):
            break
        if time.monotonic() > deadline:
            raise PhaseTimeout(f"{label}: {done} of {len(job_ids)} jobs settled")
        await anyio.sleep(POLL)
    row = await conn.fetchrow(
        "SELECT sum(j.prepared) AS tasks, "
        "extract(epoch FROM max(j.ended_at) - min(j.started_at))::float8 AS seconds, "
        "extract(epoch FROM max(j.ended_at) - min(j.created_at))::float8 AS settled "
        "FROM herder.jobs j WHERE j.id = ANY($1::bigint[])",
        job_ids,
    )
    assert row is not None
    tasks, seconds, settled = float(row["tasks"]), float(row["seconds"]), float(row["settled"])
    return tasks / max(seconds, 1e-9), tasks / max(settled, 1e-9)


async def _build_history(conn: db.Connection, tasks: int, progress: Progress) -> int:
    """``tasks`` finished tasks in jobs of HISTORY_JOB_TASKS, written the way the daemon
    writes them (inserted PENDING, then updated: every row version moves), through the
    counting trigger. Returns the first history job's id."""
    bar = progress.add_task(f"herder: building {tasks:,} finished tasks", total=tasks)
    first: int | None = None
    made = 0
    while made < tasks:
        size = min(HISTORY_JOB_TASKS, tasks - made)
        job_id: int = await conn.fetchval(
            "INSERT INTO herder.jobs (kind, payload, status, prepared, prepared_at) "
            "VALUES ('synthetic', jsonb_build_object('tasks', $1::int), 'IN_PROGRESS', $1, "
            "clock_timestamp()) RETURNING id",
            size,
        )
        first = job_id if first is None else first
        await conn.execute(
            "INSERT INTO herder.tasks (job_id, seq, payload) "
            "SELECT $1, i, jsonb_build_object('i', i) FROM generate_series(0, $2 - 1) i",
            job_id,
            size,
        )
        await conn.execute(
            "UPDATE herder.tasks SET status = 'SUCCESS', attempts = 1, "
            "started_at = clock_timestamp(), ended_at = clock_timestamp() WHERE job_id = $1",
            job_id,
        )
        await conn.execute(
            "UPDATE herder.jobs SET status = 'SUCCESS', started_at = created_at, "
            "ended_at = clock_timestamp(), message = 'history' WHERE id = $1",
            job_id,
        )
        made += size
        progress.update(bar, completed=made)
    await conn.execute("VACUUM ANALYZE herder.tasks")
    await conn.execute("VACUUM ANALYZE herder.jobs")
    assert first is not None
    return first


async def _show_ms(store: Store, job_id: int) -> float:
    """Median milliseconds of what `herder show JOB_ID` reads: the job with its counts,
    and its latest failures and warnings."""
    times = []
    for _ in range(SHOW_SAMPLES):
        started = time.perf_counter()
        await store.get_job(job_id)
        await store.job_problems(job_id)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)
