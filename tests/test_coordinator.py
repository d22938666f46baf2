"""Preparation: the seed's race, cancellation, bad input, resumption."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pytest

import herder
from herder import db
from herder.coordinator import Coordinator
from herder.kinds import Kind
from herder.metrics import Metrics
from herder.store import Store
from tests.support import job_row, running_daemon, submit, wait_finished, wait_for

INVARIANT_PROBE = """
CREATE TABLE public.violations (task_id bigint, job_status text);
CREATE TABLE public.starts (task_id bigint, job_status text);
CREATE FUNCTION public.check_start() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE js text;
BEGIN
    -- A fresh snapshot: the job's status as committed at the moment the task starts.
    SELECT status INTO js FROM herder.jobs WHERE id = NEW.job_id;
    INSERT INTO public.starts (task_id, job_status) VALUES (NEW.id, js);
    IF js NOT IN ('PENDING', 'IN_PROGRESS', 'CANCELING') THEN
        INSERT INTO public.violations VALUES (NEW.id, js);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER check_start BEFORE UPDATE ON herder.tasks FOR EACH ROW
    WHEN (NEW.status = 'IN_PROGRESS' AND OLD.status <> 'IN_PROGRESS')
    EXECUTE FUNCTION public.check_start();
"""


async def test_no_task_starts_while_its_job_is_preparing(db_url: str, conn: db.Connection) -> None:
    """The seed's bug: slow preparations writing thousands of tasks while two daemons with
    many fast workers poll for work. Checked from the database at every task start."""
    await conn.execute(INVARIANT_PROBE)
    async with running_daemon(db_url, concurrency=32), running_daemon(db_url, concurrency=32):
        jobs = [
            await submit(conn, "synthetic", {"tasks": 3000, "prepare_ms": 0.3}) for _ in range(4)
        ]

        async def tasks_written_while_preparing() -> bool:
            return bool(
                await conn.fetchval(
                    "SELECT count(*) FROM herder.tasks t JOIN herder.jobs j ON j.id = t.job_id "
                    "WHERE j.status = 'PREPARING'"
                )
            )

        # The race is only exercised if tasks really exist before their job is PENDING.
        await wait_for(tasks_written_while_preparing, what="tasks written during preparation")
        for job_id in jobs:
            assert (await wait_finished(conn, job_id, timeout=60))["status"] == "SUCCESS"
    assert await conn.fetch("SELECT * FROM public.violations") == []
    per_task = await conn.fetch(
        "SELECT t.id, t.attempts, count(s.task_id) AS starts FROM herder.tasks t "
        "LEFT JOIN public.starts s ON s.task_id = t.id GROUP BY t.id, t.attempts"
    )
    assert len(per_task) == 12000
    assert {(r["attempts"], r["starts"]) for r in per_task} == {(1, 1)}
    for job_id in jobs:
        assert (
            await conn.fetchval(
                "SELECT count(DISTINCT seq) FROM herder.tasks WHERE job_id = $1", job_id
            )
            == 3000
        )


async def test_zero_tasks_settles_success_no_tasks(db_url: str, conn: db.Connection) -> None:
    async with running_daemon(db_url):
        job = await wait_finished(conn, await submit(conn, "synthetic", {"tasks": 0}))
    assert (job["status"], job["message"]) == ("SUCCESS", "no tasks")
    assert job["ended_at"] is not None


@pytest.mark.parametrize(
    ("payload", "names"),
    [
        ({}, "'tasks'"),
        ({"tasks": "10"}, "'tasks'"),
        ({"tasks": -1}, "'tasks'"),
        ({"tasks": True}, "'tasks'"),
        ({"tasks": 3, "fail": "1"}, "'fail'"),
        ({"tasks": 3, "warn": [1.5]}, "'warn'"),
        ({"tasks": 3, "flaky": [-1]}, "'flaky'"),
        ({"tasks": 3, "task_ms": "slow"}, "'task_ms'"),
        ({"tasks": 3, "prepare_ms": -2}, "'prepare_ms'"),
        ({"tasks": 3, "colour": "red"}, "'colour'"),
        ([1, 2], "JSON object"),
    ],
)
async def test_bad_synthetic_payload_fails_the_job_naming_the_key(
    db_url: str, conn: db.Connection, payload: Any, names: str
) -> None:
    async with running_daemon(db_url):
        bad = await submit(conn, "synthetic", payload)
        good = await submit(conn, "synthetic", {"tasks": 2})
        failed = await wait_finished(conn, bad)
        assert (await wait_finished(conn, good))["status"] == "SUCCESS"
    assert failed["status"] == "FAILURE"
    assert names in failed["message"]
    assert await conn.fetchval("SELECT count(*) FROM herder.tasks WHERE job_id = $1", bad) == 0


async def test_a_kind_no_daemon_serves_waits_saying_so_and_the_daemon_goes_on(
    db_url: str, conn: db.Connection
) -> None:
    async with running_daemon(db_url):
        unserved = await submit(conn, "no_such_kind", {})
        good = await submit(conn, "synthetic", {"tasks": 5})
        assert (await wait_finished(conn, good))["status"] == "SUCCESS"

        async def says_so() -> dict[str, Any] | None:
            job = await job_row(conn, unserved)
            return job if job["message"] is not None else None

        job = await wait_for(says_so, what="the unserved job's message")
    assert (job["status"], job["message"]) == (
        "PREPARING",
        "waiting: no live daemon serves kind 'no_such_kind'",
    )


async def test_prepare_that_raises_fails_the_job_and_leaves_no_tasks(
    db_url: str, conn: db.Connection, make_kind: Callable[..., Kind]
) -> None:
    broken = make_kind("broken_prepare")

    @broken.prepare
    async def prepare(job: herder.JobContext) -> AsyncIterator[herder.JSON]:
        for i in range(25_000):  # past the first batch, so some tasks were committed
            yield {"i": i}
        raise LookupError("the search index is gone")

    @broken.process
    async def process(task: herder.TaskContext) -> herder.JSON:
        return None

    async with running_daemon(db_url):
        failed = await wait_finished(conn, await submit(conn, "broken_prepare", {}))
    assert failed["status"] == "FAILURE"
    assert "LookupError: the search index is gone" in failed["message"]
    assert await conn.fetchval("SELECT count(*) FROM herder.tasks") == 0


async def test_prepare_yielding_non_json_fails_the_job(
    db_url: str, conn: db.Connection, make_kind: Callable[..., Kind]
) -> None:
    odd = make_kind("odd_payloads")

    @odd.prepare
    async def prepare(job: herder.JobContext) -> AsyncIterator[herder.JSON]:
        yield {"when": object()}

    async with running_daemon(db_url):
        failed = await wait_finished(conn, await submit(conn, "odd_payloads", {}))
    assert failed["status"] == "FAILURE"
    assert "not JSON" in failed["message"]


async def test_cancel_during_preparation_stops_it(db_url: str, conn: db.Connection) -> None:
    async with running_daemon(db_url):
        job_id = await submit(conn, "synthetic", {"tasks": 100_000, "prepare_ms": 1})

        async def some_tasks() -> bool:
            return bool(await conn.fetchval("SELECT count(*) FROM herder.tasks"))

        await wait_for(some_tasks, what="the first batch")
        assert await conn.fetchval("SELECT herder.cancel_job($1)", job_id) is True
        job = await wait_finished(conn, job_id, timeout=5)
        written = await conn.fetchval("SELECT count(*) FROM herder.tasks")
        # Preparation stopped: nothing more is written once the job is CANCELED.
        await anyio.sleep(0.5)
        assert await conn.fetchval("SELECT count(*) FROM herder.tasks") == written
    assert job["status"] == "CANCELED"
    assert written < 100_000
    statuses = await conn.fetch("SELECT DISTINCT status FROM herder.tasks")
    assert [r["status"] for r in statuses] == ["CANCELED"]


async def test_resume_after_cancel_during_preparation_finishes_without_duplicates(
    db_url: str, conn: db.Connection
) -> None:
    async with running_daemon(db_url):
        job_id = await submit(conn, "synthetic", {"tasks": 3000, "prepare_ms": 0.5})

        async def some_tasks() -> bool:
            return bool(await conn.fetchval("SELECT count(*) FROM herder.tasks"))

        await wait_for(some_tasks, what="the first batch")
        await conn.fetchval("SELECT herder.cancel_job($1)", job_id)
        await wait_finished(conn, job_id)
        assert await conn.fetchval("SELECT herder.resume_job($1)", job_id) is True
        assert (await job_row(conn, job_id))["status"] == "PREPARING"
        job = await wait_finished(conn, job_id)
    assert job["status"] == "SUCCESS"
    counts = await conn.fetchrow(
        "SELECT count(*) AS n, count(DISTINCT seq) AS seqs, max(seq) AS last FROM herder.tasks"
    )
    assert counts is not None
    assert dict(counts) == {"n": 3000, "seqs": 3000, "last": 2999}


async def test_preparation_abandoned_by_a_dead_coordinator_is_resumed(
    db_url: str, conn: db.Connection
) -> None:
    """A coordinator that died after committing 2 batches: its lease has run out."""
    job_id = await submit(conn, "synthetic", {"tasks": 500})
    await conn.execute(
        "INSERT INTO herder.tasks (job_id, seq, payload) "
        "SELECT $1, i, jsonb_build_object('i', i) FROM generate_series(0, 199) i",
        job_id,
    )
    await conn.execute(
        "UPDATE herder.jobs SET prepared = 200, preparer = 'dead', "
        "prepare_lease_until = clock_timestamp() - interval '1 s' WHERE id = $1",
        job_id,
    )
    async with running_daemon(db_url):
        job = await wait_finished(conn, job_id)
    assert job["status"] == "SUCCESS"
    rows = await conn.fetch("SELECT seq, payload FROM herder.tasks ORDER BY seq")
    assert [r["seq"] for r in rows] == list(range(500))
    assert all(r["payload"]["i"] == r["seq"] for r in rows)


async def test_higher_priority_jobs_run_first_fifo_within(db_url: str, conn: db.Connection) -> None:
    """Three prepared jobs; one worker taking one task at a time must drain them by
    priority (higher first), and in submission order within a priority."""
    jobs = {}
    for name, priority in (("low", 0), ("high", 10), ("high_later", 10)):
        jobs[name] = await submit(conn, "synthetic", {"tasks": 50}, priority=priority)
        await conn.execute(
            "INSERT INTO herder.tasks (job_id, seq, payload) "
            "SELECT $1, i, jsonb_build_object('i', i) FROM generate_series(0, 49) i",
            jobs[name],
        )
    await conn.execute("UPDATE herder.jobs SET status = 'PENDING', prepared_at = now()")
    async with running_daemon(db_url, concurrency=1, prefetch=1):
        for job_id in jobs.values():
            await wait_finished(conn, job_id)
    order = await conn.fetchval(
        "SELECT array_agg(job_id ORDER BY started_at, id) FROM herder.tasks"
    )
    expected = [jobs["high"]] * 50 + [jobs["high_later"]] * 50 + [jobs["low"]] * 50
    assert order == expected


@pytest.mark.parametrize("fk_checked", [False, True], ids=["unchecked", "fk-checked"])
async def test_batches_load_side_by_side_and_commit_in_order(
    store: Store, conn: db.Connection, fk_checked: bool
) -> None:
    """Batches of one job load on two connections at once, yet every commit extends a
    gap-free prefix: whenever `prepared` moves, it equals the tasks the job then has.
    With the foreign key checked (a role that may not skip it), a loading batch holds a
    lock on its job that the batch before it must not wait for."""
    store = Store(store.pool, unchecked_copy=not fk_checked)
    await conn.execute("""
        CREATE TABLE public.prepared_log (
            n serial, prepared int, visible bigint, backend int, status text);
        CREATE FUNCTION public.log_prepared() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO public.prepared_log (prepared, visible, backend, status)
            SELECT NEW.prepared, count(*), pg_backend_pid(), NEW.status
            FROM herder.tasks WHERE job_id = NEW.id;
            RETURN NULL;
        END $$;
        CREATE TRIGGER log_prepared AFTER UPDATE OF prepared ON herder.jobs
            FOR EACH ROW EXECUTE FUNCTION public.log_prepared();
    """)
    job_id = await submit(conn, "synthetic", {"tasks": 60_000})
    coordinator = Coordinator(
        store, "loader", metrics=Metrics(), lease=30, poll_interval=0.1, batch_size=2000
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(coordinator.run)

        async def pending() -> bool:
            row = await job_row(conn, job_id)
            return bool(row["status"] == "PENDING")

        await wait_for(pending, what="the job to be prepared")
        tg.cancel_scope.cancel()
    log = await conn.fetch("SELECT * FROM public.prepared_log ORDER BY n")
    prepared = [r["prepared"] for r in log]
    assert prepared == sorted(prepared)
    assert set(prepared) == {2000 * (i + 1) for i in range(30)}
    assert all(r["visible"] == r["prepared"] for r in log)
    assert [r["status"] for r in log][-1] == "PENDING"
    assert len({r["backend"] for r in log}) >= 2  # loaded on more than one connection
    seqs = await conn.fetchval("SELECT count(DISTINCT seq) FROM herder.tasks")
    assert seqs == 60_000


async def test_a_job_deleted_while_loading_keeps_no_tasks(
    store: Store, conn: db.Connection, make_kind: Callable[..., Kind]
) -> None:
    """A batch loaded without the foreign key's checks commits only if its job is still
    there: deleting the job between two batches leaves no task behind."""
    gate = anyio.Event()
    between = make_kind("two_halves")

    @between.prepare
    async def prepare(job: herder.JobContext) -> AsyncIterator[herder.JSON]:
        for i in range(4000):
            if i == 2000:
                await gate.wait()
            yield {"i": i}

    job_id = await submit(conn, "two_halves", {})
    coordinator = Coordinator(
        store, "loader", metrics=Metrics(), lease=30, poll_interval=0.1, batch_size=2000
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(coordinator.run)

        async def first_half_in() -> bool:
            return bool((await job_row(conn, job_id))["prepared"] == 2000)

        await wait_for(first_half_in, what="the first batch")
        await conn.execute("DELETE FROM herder.jobs WHERE id = $1", job_id)
        gate.set()

        async def gave_up() -> bool:
            return not coordinator.preparing

        await wait_for(gave_up, what="the preparation to stop")
        tg.cancel_scope.cancel()
    assert await conn.fetchval("SELECT count(*) FROM herder.tasks") == 0
