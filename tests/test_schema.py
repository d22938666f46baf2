"""schema.sql and the control functions, straight from SQL as a psql user would."""

from __future__ import annotations

import pytest

from herder import db
from herder.states import Event, JobStatus, allowed
from herder.store import Store

CONTROLS = {
    "cancel_job": Event.CANCEL,
    "resume_job": Event.RESUME,
    "retry_job": Event.RETRY,
    "restart_job": Event.RESTART,
    "verify_job": Event.VERIFY,
}


async def test_migrate_is_idempotent_and_concurrent_safe(db_url: str) -> None:
    import anyio

    versions: list[int] = []

    async def record() -> None:
        versions.append(await db.migrate_url(db_url))

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(record)
    assert versions == [db.SCHEMA_VERSION] * 4


async def test_insert_from_psql_is_a_complete_submission(conn: db.Connection) -> None:
    job_id = await conn.fetchval(
        "INSERT INTO herder.jobs (kind, payload) "
        "VALUES ('synthetic', '{\"tasks\": 3}') RETURNING id"
    )
    row = await conn.fetchrow("SELECT * FROM herder.jobs WHERE id = $1", job_id)
    assert row is not None
    assert row["status"] == "PREPARING"
    assert row["priority"] == 0
    assert row["owner"] == await conn.fetchval("SELECT current_user")
    submitted = await conn.fetchval("SELECT herder.submit_job('synthetic', '{}', 5)")
    assert await conn.fetchval("SELECT priority FROM herder.jobs WHERE id = $1", submitted) == 5


async def test_insert_notifies_once_per_statement_on_commit(
    conn: db.Connection, db_url: str
) -> None:
    listener = await db.connect(db_url)
    received: list[str] = []
    await listener.add_listener("herder_jobs", lambda *args: received.append(args[3]))
    try:
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO herder.jobs (kind) SELECT 'synthetic' FROM generate_series(1, 50)"
            )
            await listener.fetchval("SELECT 1")
            assert received == []  # nothing before the commit
        from tests.support import wait_for

        async def got() -> bool:
            await listener.fetchval("SELECT 1")
            return bool(received)

        await wait_for(got, what="the insert notification")
        assert received == [""]
    finally:
        await listener.close()


@pytest.mark.parametrize("function", list(CONTROLS))
@pytest.mark.parametrize("status", list(JobStatus))
async def test_control_functions_follow_the_state_machine(
    conn: db.Connection, function: str, status: JobStatus
) -> None:
    job_id = await conn.fetchval(
        "INSERT INTO herder.jobs (kind, status, prepared_at) VALUES ('synthetic', $1, now()) "
        "RETURNING id",
        status.value,
    )
    applied = await conn.fetchval(f"SELECT herder.{function}($1)", job_id)
    after = JobStatus(await conn.fetchval("SELECT status FROM herder.jobs WHERE id = $1", job_id))
    targets = allowed(status, CONTROLS[function])
    assert applied is bool(targets)
    assert after in targets if applied else after == status


async def test_control_of_a_missing_job_is_false(conn: db.Connection) -> None:
    for function in CONTROLS:
        assert await conn.fetchval(f"SELECT herder.{function}(424242)") is False


async def test_job_progress_counts_tasks_by_status(conn: db.Connection) -> None:
    job_id = await conn.fetchval("INSERT INTO herder.jobs (kind) VALUES ('x') RETURNING id")
    await conn.execute(
        "INSERT INTO herder.tasks (job_id, seq, status) "
        "SELECT $1, i, (ARRAY['PENDING', 'IN_PROGRESS', 'SUCCESS', 'WARNING', 'FAILURE', "
        "'CANCELED'])[i % 6 + 1] FROM generate_series(0, 11) i",
        job_id,
    )
    row = await conn.fetchrow("SELECT * FROM herder.job_progress WHERE job_id = $1", job_id)
    assert row is not None
    assert dict(row) == {
        "job_id": job_id,
        "total": 12,
        "pending": 2,
        "in_progress": 2,
        "success": 2,
        "warning": 2,
        "failure": 2,
        "canceled": 2,
    }


async def test_migrate_upgrades_a_database_of_an_earlier_version(conn: db.Connection) -> None:
    """A database created before schema_version had its checksum column."""
    await conn.execute("ALTER TABLE herder.schema_version DROP COLUMN checksum")
    assert await db.migrate(conn) == db.SCHEMA_VERSION
    assert await conn.fetchval("SELECT checksum IS NOT NULL FROM herder.schema_version")
    # Up to date now: applying again is skipped, and answers the same.
    assert await db.migrate(conn) == db.SCHEMA_VERSION


async def test_tasks_belong_to_jobs_and_go_with_them(conn: db.Connection) -> None:
    """The contract's foreign key: no task without its job, and a job's tasks go with it."""
    import asyncpg

    jobs = [await conn.fetchval("SELECT herder.submit_job('synthetic')") for _ in range(3)]
    await conn.copy_records_to_table(
        "tasks",
        schema_name="herder",
        columns=("job_id", "seq"),
        records=[(job_id, seq) for job_id in jobs for seq in range(100)],
    )
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await conn.execute(
            "INSERT INTO herder.tasks (job_id, seq) VALUES ($1, 0), (999999, 0)", jobs[0]
        )
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await conn.copy_records_to_table(
            "tasks", schema_name="herder", columns=("job_id", "seq"), records=[(999999, 0)]
        )
    await conn.execute("DELETE FROM herder.jobs WHERE id = ANY($1::bigint[])", jobs[:2])
    rows = await conn.fetch("SELECT job_id, count(*) AS n FROM herder.tasks GROUP BY job_id")
    assert [(r["job_id"], r["n"]) for r in rows] == [(jobs[2], 100)]


async def test_migrate_upgrades_a_database_of_the_previous_schema(
    conn: db.Connection, store: Store
) -> None:
    """The previous schema's claim function also returned max_attempts; migrate replaces
    it although its result type changed."""
    await conn.execute("""
        DROP FUNCTION herder.claim_tasks(int, text, float8);
        CREATE FUNCTION herder.claim_tasks(batch int, worker_name text, lease_seconds float8)
        RETURNS TABLE (id bigint, job_id bigint, seq int, payload jsonb, attempts int,
                       attempts_base int, kind text, job_status text, max_attempts int,
                       priority int)
        LANGUAGE sql AS $$ SELECT NULL::bigint, NULL::bigint, 0, NULL::jsonb, 0, 0, '', '',
                                  0, 0 WHERE false $$;
        UPDATE herder.schema_version SET checksum = NULL;
    """)
    await db.migrate(conn)
    job_id = await store.submit("synthetic", {"tasks": 1})
    await conn.execute("INSERT INTO herder.tasks (job_id, seq) VALUES ($1, 0)", job_id)
    await conn.execute("UPDATE herder.jobs SET status = 'PENDING' WHERE id = $1", job_id)
    [claimed] = await store.claim_tasks(10, "w", 30)
    assert (claimed.job_id, claimed.seq) == (job_id, 0)
