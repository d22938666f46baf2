"""Fleet-wide limits per kind (herder.kinds.max_running), enforced in the claim: never more
tasks of the kind IN_PROGRESS across all daemons (prefetched ones count) than the limit,
and an operator's UPDATE holds from the next claim."""

from __future__ import annotations

from collections.abc import Callable

import anyio

import herder
from herder import db
from herder.kinds import Kind
from tests.support import one_task_per_item, running_daemon, submit, wait_finished


async def _peak(conn: db.Connection, job_id: int, seconds: float) -> int:
    """The most tasks of the job IN_PROGRESS at once, sampled from the database."""
    peak = 0
    with anyio.move_on_after(seconds):
        while True:
            running: int = await conn.fetchval(
                "SELECT count(*) FROM herder.tasks WHERE job_id = $1 AND status = 'IN_PROGRESS'",
                job_id,
            )
            peak = max(peak, running)
            await anyio.sleep(0.005)
    return peak


async def test_two_daemons_never_run_more_than_the_limit_and_an_update_takes_effect(
    db_url: str, conn: db.Connection, make_kind: Callable[..., Kind]
) -> None:
    kind = make_kind("llm-limited", max_running=3)
    one_task_per_item(kind)

    @kind.process
    async def process(task: herder.TaskContext) -> herder.JSON:
        await anyio.sleep(0.1)
        return None

    async with (
        running_daemon(db_url, concurrency=10, name="a"),
        running_daemon(db_url, concurrency=10, name="b"),
    ):
        job_id = await submit(conn, "llm-limited", {"items": [{}] * 200})
        limited = await _peak(conn, job_id, 1.5)
        await conn.execute("UPDATE herder.kinds SET max_running = 6 WHERE name = 'llm-limited'")
        raised = await _peak(conn, job_id, 1.5)
        await conn.execute("UPDATE herder.kinds SET max_running = NULL WHERE name = 'llm-limited'")
        job = await wait_finished(conn, job_id)
    assert limited == 3, limited
    assert raised == 6, raised
    assert job["status"] == "SUCCESS"
    row = await conn.fetchrow("SELECT * FROM herder.kinds WHERE name = 'llm-limited'")
    assert row is not None and row["max_running"] is None  # the operator's value was kept
