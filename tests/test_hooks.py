"""on_finished: once per settlement, from the outbox the settling transaction wrote."""

from __future__ import annotations

from collections.abc import Callable

import herder
from herder import db
from herder.kinds import Kind
from tests.support import one_task_per_item, running_daemon, submit, wait_finished, wait_for


def recording_kind(make_kind: Callable[..., Kind], name: str) -> list[tuple[int, str]]:
    kind = make_kind(name)
    one_task_per_item(kind)
    seen: list[tuple[int, str]] = []

    @kind.process
    async def process(task: herder.TaskContext) -> herder.JSON:
        if task.payload.get("fail"):
            raise RuntimeError("boom")
        return None

    @kind.on_finished
    async def finished(job: herder.FinishedJob) -> None:
        seen.append((job.id, job.status))

    return seen


async def test_on_finished_runs_once_per_settlement_and_not_for_cancels(
    db_url: str, conn: db.Connection, make_kind: Callable[..., Kind]
) -> None:
    seen = recording_kind(make_kind, "recorded")
    async with running_daemon(db_url):
        ok = await submit(conn, "recorded", {"items": [{}, {}]})
        bad = await submit(conn, "recorded", {"items": [{"fail": True}]})
        held = await conn.fetchval(
            "INSERT INTO herder.jobs (kind, payload, status) "
            "VALUES ('recorded', '{\"items\": [{}]}', 'UNVERIFIED') RETURNING id"
        )
        await conn.fetchval("SELECT herder.cancel_job($1)", held)
        for job_id in (ok, bad, held):
            await wait_finished(conn, job_id)

        async def both_ran() -> bool:
            return len(seen) >= 2

        await wait_for(both_ran, what="the hooks")
        # A retry settles again: the hook runs again, once.
        assert await conn.fetchval("SELECT herder.retry_job($1)", bad) is True
        await wait_finished(conn, bad)

        async def third_ran() -> bool:
            return len(seen) >= 3

        await wait_for(third_ran, what="the hook after the retry")
    assert sorted(seen) == sorted([(ok, "SUCCESS"), (bad, "FAILURE"), (bad, "FAILURE")])
    assert await conn.fetchval("SELECT count(*) FROM herder.finish_hooks") == 0


async def test_a_hook_left_pending_by_a_dead_daemon_runs_on_another(
    db_url: str, conn: db.Connection, make_kind: Callable[..., Kind]
) -> None:
    """A daemon died right after settling (hook pending, never claimed) and another died
    in the middle of a hook (claimed, lease run out): a live daemon runs both, once."""
    seen = recording_kind(make_kind, "orphaned")
    never_claimed = await conn.fetchval(
        "WITH j AS (INSERT INTO herder.jobs (kind, status, ended_at, prepared_at) "
        "VALUES ('orphaned', 'SUCCESS', now(), now()) RETURNING id, status) "
        "INSERT INTO herder.finish_hooks (job_id, status) SELECT id, status FROM j "
        "RETURNING job_id"
    )
    died_mid_hook = await conn.fetchval(
        "WITH j AS (INSERT INTO herder.jobs (kind, status, ended_at, prepared_at) "
        "VALUES ('orphaned', 'WARNING', now(), now()) RETURNING id, status) "
        "INSERT INTO herder.finish_hooks (job_id, status, attempts, runner, lease_until) "
        "SELECT id, status, 1, 'dead daemon', clock_timestamp() - interval '1 s' FROM j "
        "RETURNING job_id"
    )
    async with running_daemon(db_url):

        async def done() -> bool:
            return not await conn.fetchval("SELECT count(*) FROM herder.finish_hooks")

        await wait_for(done, what="the orphaned hooks")
    assert sorted(seen) == [(never_claimed, "SUCCESS"), (died_mid_hook, "WARNING")]


async def test_no_listen_mode_runs_on_the_poll(db_url: str, conn: db.Connection) -> None:
    """Behind a transaction-mode pooler there is no LISTEN: the poll finds the work."""
    async with running_daemon(db_url, listen=False, poll_interval=0.1) as daemon:
        job = await wait_finished(conn, await submit(conn, "synthetic", {"tasks": 30}))
        assert daemon.listener is None
    assert job["status"] == "SUCCESS"
