"""cancel, resume, retry, restart and verify, end to end against a running daemon."""

from __future__ import annotations

from collections.abc import Callable

import anyio

import herder
from herder import db
from herder.kinds import Kind
from tests.support import (
    job_row,
    one_task_per_item,
    running_daemon,
    submit,
    tasks_of,
    wait_finished,
    wait_for,
)


async def test_retry_reruns_only_the_failed_tasks(
    db_url: str, conn: db.Connection, make_kind: Callable[..., Kind]
) -> None:
    kind = make_kind("fixable", max_attempts=1)
    one_task_per_item(kind)
    broken = {"yes": True}

    @kind.process
    async def process(task: herder.TaskContext) -> herder.JSON:
        if task.payload["fragile"] and broken["yes"]:
            raise RuntimeError("disk full")
        return task.attempt

    items = [{"fragile": i in (2, 5)} for i in range(8)]
    async with running_daemon(db_url):
        job_id = await submit(conn, "fixable", {"items": items})
        first = await wait_finished(conn, job_id)
        assert (first["status"], first["message"]) == ("FAILURE", "2 of 8 tasks failed")
        before = {t["seq"]: t for t in await tasks_of(conn, job_id)}
        broken["yes"] = False
        assert await conn.fetchval("SELECT herder.retry_job($1)", job_id) is True
        assert await conn.fetchval("SELECT herder.retry_job($1)", job_id) is False
        second = await wait_finished(conn, job_id)
    assert second["status"] == "SUCCESS"
    after = {t["seq"]: t for t in await tasks_of(conn, job_id)}
    for seq, task in after.items():
        assert task["status"] == "SUCCESS"
        if seq in (2, 5):
            assert task["attempts"] == 2
            assert task["result"] == 1  # a fresh budget: attempt 1 of the retry
        else:
            assert task["attempts"] == 1
            assert task["ended_at"] == before[seq]["ended_at"]


async def test_resume_runs_the_canceled_tasks_again(db_url: str, conn: db.Connection) -> None:
    async with running_daemon(db_url, concurrency=2, prefetch=2):
        job_id = await submit(conn, "synthetic", {"tasks": 40, "task_ms": 20})
        await wait_for(
            lambda: conn.fetchval(
                "SELECT count(*) >= 4 FROM herder.tasks WHERE job_id = $1 AND status = 'SUCCESS'",
                job_id,
            ),
            what="some tasks to finish",
        )
        await conn.fetchval("SELECT herder.cancel_job($1)", job_id)
        canceled = await wait_finished(conn, job_id)
        assert canceled["status"] == "CANCELED"
        done_before = await conn.fetchval(
            "SELECT count(*) FROM herder.tasks WHERE job_id = $1 AND status = 'SUCCESS'", job_id
        )
        assert 4 <= done_before < 40
        assert await conn.fetchval("SELECT herder.resume_job($1)", job_id) is True
        resumed = await wait_finished(conn, job_id)
    assert resumed["status"] == "SUCCESS"
    attempts = await conn.fetch(
        "SELECT attempts, count(*) FROM herder.tasks WHERE job_id = $1 GROUP BY attempts", job_id
    )
    # Tasks that were running at the cancel ran twice; every other task exactly once.
    assert sum(r["count"] for r in attempts if r["attempts"] == 1) >= 40 - 2


async def test_restart_prepares_a_finished_job_afresh(db_url: str, conn: db.Connection) -> None:
    async with running_daemon(db_url):
        job_id = await submit(conn, "synthetic", {"tasks": 10, "fail": [0]})
        assert (await wait_finished(conn, job_id))["status"] == "FAILURE"
        old_ids = {t["id"] for t in await tasks_of(conn, job_id)}
        await conn.execute(
            "UPDATE herder.jobs SET payload = '{\"tasks\": 12}' WHERE id = $1", job_id
        )
        assert await conn.fetchval("SELECT herder.restart_job($1)", job_id) is True
        job = await wait_finished(conn, job_id)
    assert (job["status"], job["message"]) == ("SUCCESS", "12 of 12 tasks succeeded")
    new = await tasks_of(conn, job_id)
    assert len(new) == 12
    assert not old_ids & {t["id"] for t in new}


async def test_unverified_job_waits_for_verify(db_url: str, conn: db.Connection) -> None:
    async with running_daemon(db_url):
        held = await conn.fetchval(
            "INSERT INTO herder.jobs (kind, payload, status) "
            "VALUES ('synthetic', '{\"tasks\": 5}', 'UNVERIFIED') RETURNING id"
        )
        other = await submit(conn, "synthetic", {"tasks": 5})
        await wait_finished(conn, other)
        # The daemon has demonstrably been serving; the held job did not move.
        assert (await job_row(conn, held))["status"] == "UNVERIFIED"
        assert await conn.fetchval("SELECT count(*) FROM herder.tasks WHERE job_id = $1", held) == 0
        assert await conn.fetchval("SELECT herder.verify_job($1)", held) is True
        assert (await wait_finished(conn, held))["status"] == "SUCCESS"


async def test_cancel_of_an_unverified_or_queued_job_settles_canceled(
    db_url: str, conn: db.Connection
) -> None:
    unverified = await conn.fetchval(
        "INSERT INTO herder.jobs (kind, status) VALUES ('synthetic', 'UNVERIFIED') RETURNING id"
    )
    await conn.fetchval("SELECT herder.cancel_job($1)", unverified)
    async with running_daemon(db_url):
        job = await wait_finished(conn, unverified)
    assert job["status"] == "CANCELED"


async def test_job_moves_to_in_progress_when_its_first_task_starts(
    db_url: str, conn: db.Connection, make_kind: Callable[..., Kind]
) -> None:
    kind = make_kind("gated")
    one_task_per_item(kind)
    gate = anyio.Event()

    @kind.process
    async def process(task: herder.TaskContext) -> herder.JSON:
        await gate.wait()
        return None

    async with running_daemon(db_url):
        job_id = await submit(conn, "gated", {"items": [{}]})
        job = await wait_for(
            lambda: conn.fetchrow(
                "SELECT * FROM herder.jobs WHERE id = $1 AND status = 'IN_PROGRESS'", job_id
            ),
            what="IN_PROGRESS",
        )
        assert job["started_at"] is not None
        gate.set()
        assert (await wait_finished(conn, job_id))["status"] == "SUCCESS"
