"""Roles, row-level security and limits at the door, with real login roles."""

from __future__ import annotations

import asyncpg
import pytest

from herder import db
from tests.support import Login, as_role, running_daemon, submit, wait_finished


async def test_migrate_creates_the_roles_nologin(conn: db.Connection) -> None:
    rows = await conn.fetch(
        "SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname LIKE 'herder_%' ORDER BY 1"
    )
    assert [tuple(r) for r in rows] == [
        ("herder_submitter", False),
        ("herder_urgent", False),
        ("herder_verifier", False),
        ("herder_worker", False),
    ]


async def test_a_submitter_sees_and_controls_only_its_own_jobs(
    conn: db.Connection, login: Login
) -> None:
    alice_name, alice = await login("herder_submitter")
    _, bob = await login("herder_submitter")
    mine = await alice.fetchval(
        "INSERT INTO herder.jobs (kind, payload) VALUES ('synthetic', '{\"tasks\": 2}') "
        "RETURNING id"
    )
    also_mine = await alice.fetchval("SELECT herder.submit_job('synthetic', '{}', 3)")
    theirs = await bob.fetchval("SELECT herder.submit_job('synthetic', '{}')")
    await conn.execute(
        "INSERT INTO herder.tasks (job_id, seq) VALUES ($1, 0), ($2, 0)", mine, theirs
    )
    assert await conn.fetchval("SELECT owner FROM herder.jobs WHERE id = $1", mine) == alice_name
    assert await alice.fetchval("SELECT array_agg(id ORDER BY id) FROM herder.jobs") == [
        mine,
        also_mine,
    ]
    assert await alice.fetchval("SELECT array_agg(job_id) FROM herder.tasks") == [mine]
    assert await alice.fetchval("SELECT count(*) FROM herder.job_progress") == 2
    # Someone else's job answers false, exactly like a job that does not exist.
    for action in ("cancel", "resume", "retry", "restart", "verify"):
        assert await alice.fetchval(f"SELECT herder.{action}_job($1)", theirs) is False
    assert (
        await conn.fetchval("SELECT status FROM herder.jobs WHERE id = $1", theirs) == "PREPARING"
    )
    assert await alice.fetchval("SELECT herder.cancel_job($1)", mine) is True
    assert await conn.fetchval("SELECT status FROM herder.jobs WHERE id = $1", mine) == "CANCELING"


@pytest.mark.parametrize(
    ("statement", "error"),
    [
        (
            "INSERT INTO herder.jobs (kind, owner) VALUES ('synthetic', 'postgres')",
            asyncpg.InsufficientPrivilegeError,
        ),
        (
            "INSERT INTO herder.jobs (kind, status) VALUES ('synthetic', 'SUCCESS')",
            asyncpg.InsufficientPrivilegeError,  # row-level security: only an initial status
        ),
        (
            "INSERT INTO herder.jobs (kind, prepared) VALUES ('synthetic', 5)",
            asyncpg.InsufficientPrivilegeError,
        ),
        ("UPDATE herder.jobs SET status = 'SUCCESS'", asyncpg.InsufficientPrivilegeError),
        ("UPDATE herder.jobs SET priority = 9", asyncpg.InsufficientPrivilegeError),
        ("DELETE FROM herder.jobs", asyncpg.InsufficientPrivilegeError),
        (
            "INSERT INTO herder.tasks (job_id, seq) VALUES (1, 0)",
            asyncpg.InsufficientPrivilegeError,
        ),
        ("UPDATE herder.tasks SET status = 'SUCCESS'", asyncpg.InsufficientPrivilegeError),
        ("DELETE FROM herder.tasks", asyncpg.InsufficientPrivilegeError),
        ("UPDATE herder.settings SET value = 0", asyncpg.InsufficientPrivilegeError),
    ],
)
async def test_a_submitter_cannot_write_what_it_must_not(
    login: Login, statement: str, error: type[Exception]
) -> None:
    _, alice = await login("herder_submitter")
    with pytest.raises(error):
        await alice.execute(statement)


async def test_unverified_is_an_allowed_initial_status_and_only_a_verifier_lifts_it(
    login: Login,
) -> None:
    _, alice = await login("herder_submitter")
    _, vera = await login("herder_verifier")
    held = await alice.fetchval(
        "INSERT INTO herder.jobs (kind, status) VALUES ('synthetic', 'UNVERIFIED') RETURNING id"
    )
    assert await alice.fetchval("SELECT herder.verify_job($1)", held) is False
    assert await vera.fetchval("SELECT herder.verify_job($1)", held) is True
    assert await alice.fetchval("SELECT status FROM herder.jobs WHERE id = $1", held) == (
        "PREPARING"
    )


async def test_priority_above_the_cap_needs_herder_urgent(login: Login) -> None:
    _, plain = await login("herder_submitter")
    _, urgent = await login("herder_submitter", "herder_urgent")
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="herder_urgent"):
        await plain.execute("SELECT herder.submit_job('synthetic', '{}', 11)")
    assert await plain.fetchval("SELECT herder.submit_job('synthetic', '{}', 10)")
    assert await urgent.fetchval("SELECT herder.submit_job('synthetic', '{}', 100)")


async def test_an_oversized_payload_is_refused_at_insert(conn: db.Connection, login: Login) -> None:
    await conn.execute("UPDATE herder.settings SET value = 100 WHERE name = 'max_payload_bytes'")
    _, alice = await login("herder_submitter")
    with pytest.raises(
        asyncpg.CheckViolationError, match=r"payload is \d+ bytes; the limit is 100"
    ):
        await alice.execute(
            "INSERT INTO herder.jobs (kind, payload) VALUES ('synthetic', $1)", {"x": "y" * 200}
        )


async def test_a_job_over_the_task_limit_fails_naming_it(db_url: str, conn: db.Connection) -> None:
    await conn.execute("UPDATE herder.settings SET value = 100 WHERE name = 'max_tasks_per_job'")
    async with running_daemon(db_url):
        too_big = await wait_finished(conn, await submit(conn, "synthetic", {"tasks": 101}))
        fine = await wait_finished(conn, await submit(conn, "synthetic", {"tasks": 100}))
    assert too_big["status"] == "FAILURE"
    assert (
        "asks for 101 tasks; the limit is 100 (herder.settings max_tasks_per_job)"
        in (too_big["message"])
    )
    assert fine["status"] == "SUCCESS"
    assert (
        await conn.fetchval("SELECT count(*) FROM herder.tasks WHERE job_id = $1", too_big["id"])
        == 0
    )


async def test_a_daemon_needs_only_herder_worker(db_url: str, login: Login) -> None:
    worker_name, _ = await login("herder_worker")
    _, alice = await login("herder_submitter")
    job_id = await alice.fetchval(
        "SELECT herder.submit_job('synthetic', '{\"tasks\": 50, \"fail\": [1]}')"
    )
    async with running_daemon(as_role(db_url, worker_name)):
        job = await wait_finished(alice, job_id)
    assert (job["status"], job["message"]) == ("FAILURE", "1 of 50 tasks failed")
    assert await alice.fetchval("SELECT herder.retry_job($1)", job_id) is True
