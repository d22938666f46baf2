"""Fair sharing, decided in the claim: priority is strict, and within a level capacity is
shared across owners, then across each owner's jobs, so a small job never waits for the
big ones submitted before it."""

from __future__ import annotations

from typing import Any

from herder import db
from herder.store import Store
from tests.support import running_daemon, submit, wait_finished, wait_for


async def _submit_as(conn: db.Connection, owner: str, payload: dict[str, Any]) -> int:
    job_id: int = await conn.fetchval(
        "INSERT INTO herder.jobs (kind, payload, owner) VALUES ('synthetic', $1, $2) RETURNING id",
        payload,
        owner,
    )
    return job_id


async def _running(conn: db.Connection, job_id: int) -> bool:
    done: int = await conn.fetchval(
        "SELECT count(*) FROM herder.tasks WHERE job_id = $1 AND status = 'SUCCESS'", job_id
    )
    return done >= 50


async def _seconds_to_settle(conn: db.Connection, job_id: int) -> float:
    job = await wait_finished(conn, job_id)
    assert job["status"] == "SUCCESS", job
    return float((job["ended_at"] - job["created_at"]).total_seconds())


async def test_a_small_job_behind_a_big_one_of_the_same_owner_is_done_within_two_seconds(
    db_url: str, conn: db.Connection
) -> None:
    async with running_daemon(db_url, concurrency=10):
        big = await submit(conn, "synthetic", {"tasks": 20_000, "task_ms": 10})
        await wait_for(lambda: _running(conn, big), what="the big job to run")
        small = await submit(conn, "synthetic", {"tasks": 10, "task_ms": 10})
        seconds = await _seconds_to_settle(conn, small)
        await conn.execute("SELECT herder.cancel_job($1)", big)
    assert seconds <= 2.0, seconds


async def test_owners_share_capacity_however_many_jobs_one_of_them_has(
    db_url: str, conn: db.Connection
) -> None:
    async with running_daemon(db_url, concurrency=10):
        bigs = [await _submit_as(conn, "alice", {"tasks": 5_000, "task_ms": 10}) for _ in range(3)]
        await wait_for(lambda: _running(conn, bigs[0]), what="alice's jobs to run")
        small = await _submit_as(conn, "bob", {"tasks": 50, "task_ms": 10})
        seconds = await _seconds_to_settle(conn, small)
        started = await conn.fetch(
            "SELECT job_id, count(*) AS n FROM herder.tasks "
            "WHERE job_id = ANY($1::bigint[]) AND status <> 'PENDING' GROUP BY job_id",
            bigs,
        )
        for job_id in bigs:
            await conn.execute("SELECT herder.cancel_job($1)", job_id)
    assert seconds <= 2.0, seconds
    # Alice's three jobs shared her part too: each of them has run, not only the first.
    assert len(started) == 3, started


async def test_priority_stays_strict_between_levels(db_url: str, conn: db.Connection) -> None:
    async with running_daemon(db_url, concurrency=4):
        low = await _submit_as(conn, "alice", {"tasks": 2_000, "task_ms": 5})
        await wait_for(lambda: _running(conn, low), what="the low-priority job to run")
        urgent: int = await conn.fetchval(
            "INSERT INTO herder.jobs (kind, payload, owner, priority) "
            "VALUES ('synthetic', $1, 'bob', 5) RETURNING id",
            {"tasks": 200, "task_ms": 5},
        )
        job = await wait_finished(conn, urgent)
        # While the urgent job had tasks left to claim, no low-priority task was claimed.
        overlap: int = await conn.fetchval(
            "SELECT count(*) FROM herder.tasks l WHERE l.job_id = $1 "
            "AND l.started_at > (SELECT min(started_at) + interval '0.3 s' FROM herder.tasks "
            "                    WHERE job_id = $2) "
            "AND l.started_at < (SELECT max(started_at) FROM herder.tasks WHERE job_id = $2)",
            low,
            urgent,
        )
        await conn.execute("SELECT herder.cancel_job($1)", low)
    assert job["status"] == "SUCCESS"
    assert overlap == 0, overlap


async def test_urgent_work_runs_before_what_the_daemon_already_holds(
    db_url: str, conn: db.Connection
) -> None:
    """A daemon holding a second of 100 ms tasks claims a higher-priority job at its next
    claim, and runs it before what it holds: its local queue is ordered by priority."""
    async with running_daemon(db_url, concurrency=10):
        slow = await _submit_as(conn, "alice", {"tasks": 2_000, "task_ms": 100})

        async def holding() -> bool:
            held: int = await conn.fetchval(
                "SELECT count(*) FROM herder.tasks WHERE job_id = $1 AND status = 'IN_PROGRESS'",
                slow,
            )
            return held >= 50

        await wait_for(holding, what="the daemon to hold slow tasks")
        urgent: int = await conn.fetchval(
            "INSERT INTO herder.jobs (kind, payload, owner, priority) "
            "VALUES ('synthetic', $1, 'bob', 5) RETURNING id",
            {"tasks": 10, "task_ms": 100},
        )
        seconds = await _seconds_to_settle(conn, urgent)
        await conn.execute("SELECT herder.cancel_job($1)", slow)
    assert seconds <= 1.5, seconds


async def test_a_small_job_is_prepared_and_done_behind_three_long_preparations(
    db_url: str, conn: db.Connection
) -> None:
    """Long preparations hold the coordinator's two long slots (and a third waits for
    one); a small job's preparation has its own path and starts at once."""
    async with running_daemon(db_url, concurrency=10):
        longs = [
            await submit(conn, "synthetic", {"tasks": 100_000, "prepare_ms": 1}) for _ in range(3)
        ]

        async def preparing() -> bool:
            n: int = await conn.fetchval(
                "SELECT count(*) FROM herder.jobs WHERE id = ANY($1::bigint[]) "
                "AND preparer IS NOT NULL",
                longs,
            )
            return n == 3

        await wait_for(preparing, what="three long preparations to be held")
        small = await submit(conn, "synthetic", {"tasks": 10, "task_ms": 10})
        seconds = await _seconds_to_settle(conn, small)
        for job_id in longs:
            await conn.execute("SELECT herder.cancel_job($1)", job_id)
    assert seconds <= 2.0, seconds


async def test_claims_share_jobs_only_with_fair_sharing_on(
    conn: db.Connection, store: Store
) -> None:
    """`herder run --no-fair-sharing` (for measuring what fairness costs) claims strictly
    in job order; by default a claim shares its batch across the jobs."""
    jobs = []
    for owner in ("alice", "bob"):
        job_id: int = await conn.fetchval(
            "INSERT INTO herder.jobs (kind, owner, status, prepared) "
            "VALUES ('synthetic', $1, 'PENDING', 20) RETURNING id",
            owner,
        )
        await conn.execute(
            "INSERT INTO herder.tasks (job_id, seq) SELECT $1, i FROM generate_series(0, 19) i",
            job_id,
        )
        jobs.append(job_id)
    strict = await store.claim_tasks(10, "w", 30, fair=False)
    assert {t.job_id for t in strict} == {jobs[0]}
    shared = await store.claim_tasks(10, "w", 30)
    assert sorted(t.job_id for t in shared) == [jobs[0]] * 5 + [jobs[1]] * 5
