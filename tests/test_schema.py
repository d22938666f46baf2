"""schema.sql and the control functions, straight from SQL as a psql user would."""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from herder import db
from herder.sql import Upgrade, schema_sql, upgrades
from herder.states import Event, JobStatus, allowed
from herder.store import Store
from tests.support import Login, as_role, with_database

CONTROLS = {
    "cancel_job": Event.CANCEL,
    "resume_job": Event.RESUME,
    "retry_job": Event.RETRY,
    "restart_job": Event.RESTART,
    "verify_job": Event.VERIFY,
}


async def test_migrate_is_idempotent_and_concurrent_safe(db_url: str) -> None:
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


# ---------------------------------------------------------------- upgrades

# The herder schema as the catalog describes it. Two databases giving the same answers
# have the same tables, views and sequences (options, definitions, grants), columns,
# constraints, indexes, functions (bodies, settings, grants), triggers and policies.
CATALOG = {
    "relations": """
        SELECT c.relname, c.relkind::text, c.reloptions::text, c.relacl::text,
               c.relrowsecurity, CASE c.relkind WHEN 'v' THEN pg_get_viewdef(c.oid) END
        FROM pg_class c
        WHERE c.relnamespace = 'herder'::regnamespace AND c.relkind IN ('r', 'v', 'S')
        ORDER BY 1""",
    "columns": """
        SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
               pg_get_expr(d.adbin, d.adrelid), a.attidentity::text, a.attstattarget,
               a.attacl::text
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE c.relnamespace = 'herder'::regnamespace AND c.relkind IN ('r', 'v')
          AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY 1, 2""",
    "constraints": """
        SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid), convalidated
        FROM pg_constraint WHERE connamespace = 'herder'::regnamespace ORDER BY 1, 2""",
    "indexes": """
        SELECT c.relname, pg_get_indexdef(c.oid)
        FROM pg_class c
        WHERE c.relnamespace = 'herder'::regnamespace AND c.relkind = 'i'
        ORDER BY 1""",
    "functions": """
        SELECT p.proname, pg_get_function_identity_arguments(p.oid), pg_get_functiondef(p.oid),
               p.proacl::text
        FROM pg_proc p WHERE p.pronamespace = 'herder'::regnamespace ORDER BY 1, 2""",
    "triggers": """
        SELECT c.relname, t.tgname, pg_get_triggerdef(t.oid), t.tgenabled::text
        FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
        WHERE c.relnamespace = 'herder'::regnamespace AND NOT t.tgisinternal
        ORDER BY 1, 2""",
    "policies": """
        SELECT tablename, policyname, permissive, roles::text, cmd, qual, with_check
        FROM pg_policies WHERE schemaname = 'herder' ORDER BY 1, 2""",
}


async def catalog(conn: db.Connection) -> dict[str, list[tuple[Any, ...]]]:
    return {name: [tuple(row) for row in await conn.fetch(sql)] for name, sql in CATALOG.items()}


# Each earlier shape is written as what turns a current database into it: the features
# that tell it apart, newest first, as the commit named left them (trigger functions'
# bodies aside). Not the historical schema.sql files: history is not at hand where tests
# run.

# Before the per-job counts (f302fdf): progress counted tasks; no counts, deltas or
# count triggers; no index of a job's problems.
_BEFORE_JOB_COUNTS = """
    DROP TRIGGER tasks_counted_insert ON herder.tasks;
    DROP TRIGGER tasks_counted_update ON herder.tasks;
    DROP TRIGGER tasks_counted_delete ON herder.tasks;
    CREATE OR REPLACE VIEW herder.job_progress WITH (security_invoker = true) AS
    SELECT j.id AS job_id,
           count(t.id) AS total,
           count(t.id) FILTER (WHERE t.status = 'PENDING') AS pending,
           count(t.id) FILTER (WHERE t.status = 'IN_PROGRESS') AS in_progress,
           count(t.id) FILTER (WHERE t.status = 'SUCCESS') AS success,
           count(t.id) FILTER (WHERE t.status = 'WARNING') AS warning,
           count(t.id) FILTER (WHERE t.status = 'FAILURE') AS failure,
           count(t.id) FILTER (WHERE t.status = 'CANCELED') AS canceled
    FROM herder.jobs j LEFT JOIN herder.tasks t ON t.job_id = j.id
    GROUP BY j.id;
    DROP FUNCTION herder.task_counts(bigint), herder.count_task_changes();
    DROP TABLE herder.job_counts, herder.job_count_deltas;
    DROP INDEX herder.tasks_problems_idx;
"""
# Before containment (7427e6e): the on_finished outbox was a flag on the job (set here on
# the settled job: its hook has not run yet); no verification or batched-control
# columns; no herder_verifier policy; no B-tree of a job's tasks.
_BEFORE_CONTAINMENT = """
    DROP TABLE herder.finish_hooks;
    ALTER TABLE herder.jobs
        DROP COLUMN verified, DROP COLUMN stale_tasks, DROP COLUMN reopening,
        DROP COLUMN reopen_from,
        ADD COLUMN finish_pending boolean NOT NULL DEFAULT false,
        ADD COLUMN finish_lease_until timestamptz;
    CREATE INDEX jobs_finish_pending_idx ON herder.jobs (id) WHERE finish_pending;
    UPDATE herder.jobs SET finish_pending = true WHERE status = 'SUCCESS';
    DROP FUNCTION herder.may_verify();
    DROP POLICY jobs_verifier_read ON herder.jobs;
    DROP INDEX herder.tasks_job_idx;
"""
# From the claim-path indexes (d6e05ce) to containment: a BRIN index found a job's tasks.
_TASKS_JOB_BRIN = """
    CREATE INDEX tasks_job_brin ON herder.tasks USING brin (job_id) WITH (autosummarize = on);
"""
# From 50fa58f to 72aa378: statement-level triggers instead of the foreign key, and a task
# whose job is gone (loading without per-row checks skipped the trigger).
_INTEGRITY_TRIGGERS = """
    ALTER TABLE herder.tasks DROP CONSTRAINT tasks_job_id_fkey;
    CREATE FUNCTION herder.check_tasks_have_jobs() RETURNS trigger
    LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END; $$;
    CREATE TRIGGER tasks_have_jobs AFTER INSERT ON herder.tasks
        REFERENCING NEW TABLE AS new_tasks
        FOR EACH STATEMENT EXECUTE FUNCTION herder.check_tasks_have_jobs();
    CREATE FUNCTION herder.delete_tasks_of_deleted_jobs() RETURNS trigger
    LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END; $$;
    CREATE TRIGGER jobs_deleted AFTER DELETE ON herder.jobs
        REFERENCING OLD TABLE AS deleted_jobs
        FOR EACH STATEMENT EXECUTE FUNCTION herder.delete_tasks_of_deleted_jobs();
    INSERT INTO herder.tasks (job_id, seq) VALUES (0, 0);
"""
# From one-call claims (724a250) to bad7a90: claim_tasks also returned max_attempts.
_CLAIM_WITH_MAX_ATTEMPTS = """
    DROP FUNCTION herder.claim_tasks(int, text, float8);
    CREATE FUNCTION herder.claim_tasks(batch int, worker_name text, lease_seconds float8)
    RETURNS TABLE (id bigint, job_id bigint, seq int, payload jsonb, attempts int,
                   attempts_base int, kind text, job_status text, max_attempts int,
                   priority int)
    LANGUAGE sql AS $$ SELECT NULL::bigint, NULL::bigint, 0, NULL::jsonb, 0, 0, '', '',
                              0, 0 WHERE false $$;
"""
# Before roles and limits (bc034f8), and before one-call claims (724a250): no settings or
# limits trigger, no row-level security, no claim function, no checksum.
_BEFORE_ROLES = """
    DROP FUNCTION herder.claim_tasks(int, text, float8);
    DROP TRIGGER jobs_limits ON herder.jobs;
    DROP FUNCTION herder.check_job_limits(), herder.setting(text);
    DROP TABLE herder.settings;
    DROP POLICY jobs_worker ON herder.jobs;
    DROP POLICY tasks_worker ON herder.tasks;
    DROP POLICY jobs_own_read ON herder.jobs;
    DROP POLICY jobs_own_insert ON herder.jobs;
    DROP POLICY tasks_own_read ON herder.tasks;
    ALTER TABLE herder.jobs DISABLE ROW LEVEL SECURITY;
    ALTER TABLE herder.tasks DISABLE ROW LEVEL SECURITY;
    ALTER TABLE herder.schema_version DROP COLUMN checksum;
"""
# The engine core (ce64d6c): a unique (job_id, seq), a lease index, and the pending set
# keyed by (job_id, id).
_ENGINE_CORE_TASK_INDEXES = """
    ALTER TABLE herder.tasks ADD CONSTRAINT tasks_job_seq_key UNIQUE (job_id, seq);
    CREATE INDEX tasks_lease_idx ON herder.tasks (lease_until) WHERE status = 'IN_PROGRESS';
    DROP INDEX herder.tasks_pending_idx;
    CREATE INDEX tasks_pending_idx ON herder.tasks (job_id, id) WHERE status = 'PENDING';
"""

# Before fair sharing and routing by kind: a claim of three arguments, jobs walked by
# priority and id.
_BEFORE_FAIR_CLAIM = """
    DROP FUNCTION herder.claim_tasks(int, text, float8, text[], boolean);
    CREATE FUNCTION herder.claim_tasks(batch int, worker_name text, lease_seconds float8)
    RETURNS TABLE (id bigint, job_id bigint, seq int, payload jsonb, attempts int,
                   attempts_base int, kind text, job_status text, priority int)
    LANGUAGE sql AS $$ SELECT NULL::bigint, NULL::bigint, 0, NULL::jsonb, 0, 0, '', '', 0
                       WHERE false $$;
    DROP INDEX herder.jobs_claimable_idx;
    CREATE INDEX jobs_runnable_idx ON herder.jobs (priority DESC, id)
        WHERE status IN ('PENDING', 'IN_PROGRESS');
"""

SHAPES: dict[str, list[str]] = {
    "ce64d6c engine core": [
        _BEFORE_FAIR_CLAIM,
        _BEFORE_JOB_COUNTS,
        _BEFORE_CONTAINMENT,
        _BEFORE_ROLES,
        _ENGINE_CORE_TASK_INDEXES,
    ],
    "d6e05ce claim-path indexes": [
        _BEFORE_FAIR_CLAIM,
        _BEFORE_JOB_COUNTS,
        _BEFORE_CONTAINMENT,
        _TASKS_JOB_BRIN,
        _BEFORE_ROLES,
    ],
    "724a250 one-call claims": [
        _BEFORE_FAIR_CLAIM,
        _BEFORE_JOB_COUNTS,
        _BEFORE_CONTAINMENT,
        _TASKS_JOB_BRIN,
        _CLAIM_WITH_MAX_ATTEMPTS,
    ],
    "72aa378 integrity triggers": [
        _BEFORE_FAIR_CLAIM,
        _BEFORE_JOB_COUNTS,
        _BEFORE_CONTAINMENT,
        _TASKS_JOB_BRIN,
        _INTEGRITY_TRIGGERS,
    ],
    "b2bf520 foreign key kept": [
        _BEFORE_FAIR_CLAIM,
        _BEFORE_JOB_COUNTS,
        _BEFORE_CONTAINMENT,
        _TASKS_JOB_BRIN,
    ],
    "7427e6e containment": [_BEFORE_FAIR_CLAIM, _BEFORE_JOB_COUNTS],
    "f302fdf per-job counts": [_BEFORE_FAIR_CLAIM],
    # The current shape, made before upgrade steps were recorded: every step runs on it
    # and must change nothing.
    "fair claim": [],
}

# What no earlier version had: the record of upgrade steps (and the checksum they cover).
_BEFORE_UPGRADE_STEPS = """
    ALTER TABLE herder.schema_version DROP COLUMN upgrades;
    DO $$
    BEGIN
        IF EXISTS (SELECT FROM pg_catalog.pg_attribute
                   WHERE attrelid = 'herder.schema_version'::regclass
                     AND attname = 'checksum' AND NOT attisdropped) THEN
            UPDATE herder.schema_version SET checksum = 'of an earlier schema.sql';
        END IF;
    END;
    $$;
"""

# A settled job and a running one, with tasks of every status: what any version kept.
_SEED = """
    INSERT INTO herder.jobs (kind, status)
    VALUES ('settled', 'SUCCESS'), ('running', 'IN_PROGRESS');
    INSERT INTO herder.tasks (job_id, seq, status)
    SELECT j.id, i, CASE j.kind
        WHEN 'settled' THEN (ARRAY['SUCCESS', 'WARNING', 'CANCELED'])[i % 3 + 1]
        ELSE (ARRAY['PENDING', 'IN_PROGRESS', 'FAILURE'])[i % 3 + 1] END
    FROM herder.jobs j, generate_series(0, 8) i;
"""

_RECOUNT = """
    SELECT j.id AS job_id, count(t.id) AS total,
           count(t.id) FILTER (WHERE t.status = 'PENDING') AS pending,
           count(t.id) FILTER (WHERE t.status = 'IN_PROGRESS') AS in_progress,
           count(t.id) FILTER (WHERE t.status = 'SUCCESS') AS success,
           count(t.id) FILTER (WHERE t.status = 'WARNING') AS warning,
           count(t.id) FILTER (WHERE t.status = 'FAILURE') AS failure,
           count(t.id) FILTER (WHERE t.status = 'CANCELED') AS canceled
    FROM herder.jobs j LEFT JOIN herder.tasks t ON t.job_id = j.id
    GROUP BY j.id ORDER BY j.id
"""

ALL_STEPS = [step.number for step in upgrades()]


async def _make_shape(conn: db.Connection, shape: str) -> None:
    await conn.execute(_SEED)
    for features in SHAPES[shape]:
        await conn.execute(features)
    await conn.execute(_BEFORE_UPGRADE_STEPS)


async def _assert_upgraded(
    conn: db.Connection, fresh: dict[str, list[tuple[Any, ...]]], shape: str
) -> None:
    """Same catalog as a new database, every step recorded once, and the data kept: the
    counts are the tasks' (backfilled where there were none), and a hook pending on the
    old flag is in the outbox, once."""
    upgraded = await catalog(conn)
    for part, rows in fresh.items():
        assert upgraded[part] == rows, part
    assert await conn.fetchval("SELECT upgrades FROM herder.schema_version") == ALL_STEPS
    progress = await conn.fetch("SELECT * FROM herder.job_progress ORDER BY job_id")
    assert [dict(r) for r in progress] == [dict(r) for r in await conn.fetch(_RECOUNT)]
    hooks = await conn.fetch(
        "SELECT j.kind, h.status FROM herder.finish_hooks h JOIN herder.jobs j ON j.id = h.job_id"
    )
    flagged = _BEFORE_CONTAINMENT in SHAPES[shape]
    assert [tuple(r) for r in hooks] == ([("settled", "SUCCESS")] if flagged else [])


@pytest.mark.parametrize("shape", list(SHAPES))
async def test_migrate_upgrades_a_database_of_each_earlier_shape(
    conn: db.Connection, store: Store, shape: str
) -> None:
    fresh = await catalog(conn)
    await _make_shape(conn, shape)
    assert await db.migrate(conn) == db.SCHEMA_VERSION
    await _assert_upgraded(conn, fresh, shape)
    # Up to date now: skipped by its checksum. Forced through again, no step runs twice.
    assert await db.migrate(conn) == db.SCHEMA_VERSION
    await conn.execute("UPDATE herder.schema_version SET checksum = NULL")
    assert await db.migrate(conn) == db.SCHEMA_VERSION
    await _assert_upgraded(conn, fresh, shape)
    claimed = await store.claim_tasks(10, "w", 30)
    assert sorted(task.seq for task in claimed) == [0, 3, 6]


async def test_concurrent_migrates_upgrade_an_old_database_once(
    conn: db.Connection, db_url: str
) -> None:
    shape = "ce64d6c engine core"
    fresh = await catalog(conn)
    await _make_shape(conn, shape)
    versions: list[int] = []

    async def migrate() -> None:
        versions.append(await db.migrate_url(db_url))

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(migrate)
    assert versions == [db.SCHEMA_VERSION] * 4
    await _assert_upgraded(conn, fresh, shape)


_EMPTY = itertools.count()


@pytest.fixture
async def empty_url(server_url: str) -> AsyncIterator[str]:
    """A database with no herder schema at all, dropped after the test."""
    name = f"herder_empty_{os.getpid()}_{next(_EMPTY)}"
    admin = await db.connect(server_url)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        yield with_database(server_url, name)
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


async def test_a_new_database_gets_schema_sql_alone(conn: db.Connection, empty_url: str) -> None:
    """Nothing to upgrade: migrate (which made the template ``conn`` is cloned from) gives
    what schema.sql gives applied with psql, and records every step as applied. Migrating
    the psql-made database, which records none, runs every step on the current shape:
    none changes anything."""
    fresh = await catalog(conn)
    assert await conn.fetchval("SELECT upgrades FROM herder.schema_version") == ALL_STEPS
    new = await db.connect(empty_url)
    try:
        await new.execute(schema_sql())
        assert await catalog(new) == fresh
        assert await new.fetchval("SELECT upgrades FROM herder.schema_version") == []
        assert await db.migrate(new) == db.SCHEMA_VERSION
        assert await catalog(new) == fresh
        assert await new.fetchval("SELECT upgrades FROM herder.schema_version") == ALL_STEPS
    finally:
        await new.close()


async def test_a_step_added_later_runs_once(
    conn: db.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    added = Upgrade(999, "999_later.sql", "CREATE TABLE herder.added_later (x int)")
    monkeypatch.setattr(db, "upgrades", lambda: [*upgrades(), added])
    # The checksum covers the steps: the database is not up to date any more.
    assert await db.migrate(conn) == db.SCHEMA_VERSION
    assert await conn.fetchval("SELECT to_regclass('herder.added_later') IS NOT NULL")
    assert await conn.fetchval("SELECT upgrades FROM herder.schema_version") == [
        *ALL_STEPS,
        999,
    ]
    # Run again it would fail (the table exists): recorded, it is not run again.
    await conn.execute("UPDATE herder.schema_version SET checksum = NULL")
    assert await db.migrate(conn) == db.SCHEMA_VERSION


async def test_herder_worker_starts_on_an_up_to_date_database(db_url: str, login: Login) -> None:
    """The role may create nothing: migrate must recognise the database, steps included."""
    name, _ = await login("herder_worker")
    assert await db.migrate_url(as_role(db_url, name)) == db.SCHEMA_VERSION


def test_upgrade_steps_are_numbered_in_order() -> None:
    steps = upgrades()
    assert [step.number for step in steps] == list(range(1, len(steps) + 1))
    assert all(step.name.startswith(f"{step.number:03d}_") for step in steps)
