"""A month of history must slow nothing: every per-job read and write goes
through an index that starts with the job, so a planner change cannot silently bring
back a scan of the whole table. The history is built the way the daemon writes it:
inserted PENDING, then updated, so every row version has moved."""

from __future__ import annotations

import json
from typing import Any

import pytest

from herder import db
from herder.sql import QUERIES as Q
from herder.store import Store

HISTORY_JOBS = 10
TASKS_PER_JOB = 5_000
#: The indexes of tasks that start with job_id: any of them narrows a read to one job.
#: The statements of Store._settle_batch.
SETTLEMENT = {"lock_for_settlement", "task_counts", "apply_settlements"}
JOB_INDEXES = {"tasks_job_idx", "tasks_pending_idx", "tasks_running_idx", "tasks_problems_idx"}


async def _build_history(conn: db.Connection) -> tuple[list[int], int]:
    """HISTORY_JOBS finished jobs of TASKS_PER_JOB tasks, a few failed, and one live job
    of 5 tasks; returns (history job ids, the live job's id)."""
    history = []
    for _ in range(HISTORY_JOBS):
        job_id: int = await conn.fetchval(
            "INSERT INTO herder.jobs (kind, status, prepared, prepared_at) "
            "VALUES ('synthetic', 'IN_PROGRESS', $1, now()) RETURNING id",
            TASKS_PER_JOB,
        )
        await conn.execute(
            "INSERT INTO herder.tasks (job_id, seq, payload) "
            "SELECT $1, i, jsonb_build_object('i', i) FROM generate_series(0, $2 - 1) i",
            job_id,
            TASKS_PER_JOB,
        )
        await conn.execute(
            "UPDATE herder.tasks SET status = CASE WHEN seq % 1000 = 7 THEN 'FAILURE' "
            "ELSE 'SUCCESS' END, attempts = 1, ended_at = now() WHERE job_id = $1",
            job_id,
        )
        await conn.execute(
            "UPDATE herder.jobs SET status = 'FAILURE', ended_at = now() - interval '40 days' "
            "WHERE id = $1",
            job_id,
        )
        history.append(job_id)
    live: int = await conn.fetchval(
        "INSERT INTO herder.jobs (kind, status, prepared, prepared_at) "
        "VALUES ('synthetic', 'IN_PROGRESS', 5, now()) RETURNING id"
    )
    await conn.execute(
        "INSERT INTO herder.tasks (job_id, seq) SELECT $1, i FROM generate_series(0, 4) i", live
    )
    await conn.execute("ANALYZE herder.tasks")
    await conn.execute("ANALYZE herder.jobs")
    return history, live


def _scans(plan: Any) -> list[tuple[str, str | None, str | None]]:
    """(node type, relation, index) of every scan in an EXPLAIN (FORMAT JSON) plan."""
    found = []
    stack = [plan[0]["Plan"]]
    while stack:
        node = stack.pop()
        if "Scan" in node["Node Type"]:
            found.append((node["Node Type"], node.get("Relation Name"), node.get("Index Name")))
        stack.extend(node.get("Plans", []))
    return found


async def _plan(conn: db.Connection, query: str, *args: Any) -> list[tuple[str, Any, Any]]:
    text = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {query}", *args)
    return _scans(json.loads(text) if isinstance(text, str) else text)


@pytest.fixture
async def history(conn: db.Connection) -> tuple[list[int], int]:
    return await _build_history(conn)


@pytest.mark.parametrize(
    ("query", "args"),
    [
        # herder show: the failures and warnings of a job
        ("job_problems", lambda h, live: {"job_id": h[3], "limit": 5}),
        # retention: a batch of an old job's tasks
        (
            "prune_tasks",
            lambda h, live: {"job_ids": [h[0]], "retention_seconds": 30 * 86400.0, "batch": 5000},
        ),
        # restart and failed preparations: a window of a job's old tasks
        (
            "discard_stale_batch",
            lambda h, live: {"job_id": h[1], "stale_tasks": TASKS_PER_JOB, "window": 5000},
        ),
        # resume and retry: a window of a job's tasks reopened
        (
            "reopen_batch",
            lambda h, live: {
                "job_id": h[2],
                "reopen_from": 0,
                "window": 5000,
                "reopening": "retry",
            },
        ),
        (
            "reopen_batch",
            lambda h, live: {
                "job_id": h[2],
                "reopen_from": 0,
                "window": 5000,
                "reopening": "resume",
            },
        ),
        # cancel: a batch of a job's pending tasks
        ("cancel_pending_batch", lambda h, live: {"job_id": live, "batch": 5000}),
    ],
)
async def test_per_job_statements_use_the_jobs_index_never_a_table_scan(
    conn: db.Connection, history: tuple[list[int], int], query: str, args: Any
) -> None:
    scans = await _plan(conn, *Q.bind(query, **args(*history)))
    on_tasks = [s for s in scans if s[1] == "tasks" or s[2] in JOB_INDEXES]
    assert on_tasks, scans
    assert all(s[0] != "Seq Scan" for s in on_tasks), scans
    assert any(s[2] in JOB_INDEXES for s in on_tasks), scans


async def test_settlement_and_progress_read_the_counts_not_the_tasks(
    conn: db.Connection, history: tuple[list[int], int]
) -> None:
    old, live = history
    cases: list[tuple[str, dict[str, Any]]] = [
        ("settle_candidates", {"job_ids": [live]}),
        ("lock_for_settlement", {"job_ids": [live]}),
        ("task_counts", {"job_ids": [live, old[0]]}),
        ("get_job", {"job_id": old[0]}),
    ]
    for query, args in cases:
        scans = await _plan(conn, *Q.bind(query, **args))
        assert all(s[0] != "Seq Scan" for s in scans if s[1] == "tasks"), (query, scans)
    # The counts function reads the counts tables only.
    body = await conn.fetchval(
        "SELECT prosrc FROM pg_proc WHERE oid = 'herder.task_counts(bigint)'::regprocedure"
    )
    assert "herder.tasks" not in body
    for table in ("job_counts", "job_count_deltas"):
        scans = await _plan(conn, f"SELECT * FROM herder.{table} WHERE job_id = $1", old[0])
        assert all(s[0] != "Seq Scan" for s in scans), (table, scans)


async def test_counts_of_a_history_are_exact_and_survive_folding_and_retention(
    conn: db.Connection, store: Store, history: tuple[list[int], int]
) -> None:
    old, live = history
    counts = "SELECT * FROM herder.task_counts($1)"
    before = dict(await conn.fetchrow(counts, old[0]) or {})
    assert before == {
        "pending": 0,
        "in_progress": 0,
        "success": TASKS_PER_JOB - TASKS_PER_JOB // 1000,
        "warning": 0,
        "failure": TASKS_PER_JOB // 1000,
        "canceled": 0,
    }
    assert await store.fold_counts() > 0
    assert await conn.fetchval("SELECT count(*) FROM herder.job_count_deltas") == 0
    assert dict(await conn.fetchrow(counts, old[0]) or {}) == before
    progress = "SELECT pending FROM herder.job_progress WHERE job_id = $1"
    assert await conn.fetchval(progress, live) == 5
    # Retention deletes the history; the counts go with the jobs.
    assert await store.prune(30 * 86400.0) == (HISTORY_JOBS, HISTORY_JOBS * TASKS_PER_JOB)
    await store.fold_counts()
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM herder.job_counts WHERE job_id = ANY($1::bigint[])", old
        )
        == 0
    )


async def test_statements_on_many_jobs_read_them_by_index_even_on_stale_statistics(
    conn: db.Connection,
) -> None:
    """Statistics taken while the jobs table was small (a fresh service, or one whose
    history is a few big jobs) make a scan of every job look cheap; thousands of small
    jobs submitted before the next analyze then paid that scan in every statement that
    names a batch of them (start_jobs cost 46 ms a claim). Each must read its jobs by
    index whatever the statistics say."""
    await conn.execute("INSERT INTO herder.jobs (kind, status) VALUES ('synthetic', 'SUCCESS')")
    await conn.execute("ANALYZE herder.jobs")
    ids: list[int] = [
        r["id"]
        for r in await conn.fetch(
            "INSERT INTO herder.jobs (kind, status) "
            "SELECT 'synthetic', 'PENDING' FROM generate_series(1, 5000) RETURNING id"
        )
    ]
    batch = ids[2000:2050]
    cases: list[tuple[str, dict[str, Any]]] = [
        ("start_jobs", {"job_ids": batch}),
        ("lock_for_settlement", {"job_ids": batch}),
        ("settle_candidates", {"job_ids": batch}),
        ("task_counts", {"job_ids": batch}),
        (
            "apply_settlements",
            {
                "job_ids": batch,
                "statuses": ["SUCCESS"] * 50,
                "messages": [None] * 50,
                "hooked": [False] * 50,
                "announced": [False] * 50,
            },
        ),
        (
            "claim_preparations",
            {"preparer": "d", "lease_seconds": 30.0, "limit": 64, "kinds": ["synthetic"]},
        ),
        (
            "write_small_preparations",
            {
                "job_ids": batch,
                "generations": [1] * 50,
                "max_attempts": [3] * 50,
                "task_counts": [1] * 50,
                "preparer": "d",
                "task_job_ids": batch,
                "seqs": [0] * 50,
                "payloads": ["{}"] * 50,
            },
        ),
        ("jobs_not_running", {"job_ids": batch}),
    ]
    for query, args in cases:
        async with conn.transaction():
            if query in SETTLEMENT:  # Store._settle_batch: one transaction preferring indexes
                await conn.execute(Q["prefer_indexes"])
            scans = await _plan(conn, *Q.bind(query, **args))
        assert not [s for s in scans if s[0] == "Seq Scan" and s[1] in ("jobs", "tasks")], (
            query,
            scans,
        )
