"""Running tasks: outcomes, retries, timeouts, cancellation, fencing, settlement."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest

import herder
from herder import db
from herder.kinds import Kind
from herder.metrics import Metrics
from herder.store import Outcome, Store
from herder.worker import Worker
from tests.support import (
    job_row,
    one_task_per_item,
    running_daemon,
    submit,
    tasks_of,
    wait_finished,
    wait_for,
)

SETTLEMENT_LOG = """
CREATE TABLE public.settlements (job_id bigint, status text);
CREATE FUNCTION public.log_settlement() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.settlements VALUES (NEW.id, NEW.status);
    RETURN NEW;
END $$;
CREATE TRIGGER log_settlement AFTER UPDATE OF status ON herder.jobs FOR EACH ROW
    WHEN (NEW.status IN ('SUCCESS', 'WARNING', 'FAILURE', 'CANCELED')
          AND OLD.status NOT IN ('SUCCESS', 'WARNING', 'FAILURE', 'CANCELED'))
    EXECUTE FUNCTION public.log_settlement();
"""


@pytest.mark.parametrize(
    ("payload", "status", "message"),
    [
        ({"tasks": 20}, "SUCCESS", "20 of 20 tasks succeeded"),
        ({"tasks": 20, "warn": [3, 4]}, "WARNING", "2 of 20 tasks with warnings"),
        ({"tasks": 20, "warn": [3], "fail": [5]}, "FAILURE", "1 of 20 tasks failed"),
        ({"tasks": 20, "flaky": [1, 2]}, "SUCCESS", "20 of 20 tasks succeeded"),
    ],
)
async def test_synthetic_outcomes_settle_the_job(
    db_url: str, conn: db.Connection, payload: dict[str, Any], status: str, message: str
) -> None:
    async with running_daemon(db_url):
        job = await wait_finished(conn, await submit(conn, "synthetic", payload))
    assert (job["status"], job["message"]) == (status, message)
    assert job["started_at"] is not None and job["ended_at"] >= job["started_at"]
    tasks = await tasks_of(conn, job["id"])
    assert [t["payload"]["i"] for t in tasks] == list(range(20))
    for t in tasks:
        i = t["payload"]["i"]
        want = (
            "FAILURE"
            if i in payload.get("fail", [])
            else "WARNING"
            if i in payload.get("warn", [])
            else "SUCCESS"
        )
        assert t["status"] == want
        assert t["attempts"] == (2 if i in payload.get("flaky", []) else 1)
        assert t["started_at"] is not None and t["ended_at"] is not None
    failed = [t for t in tasks if t["status"] == "FAILURE"]
    for t in failed:
        assert t["message"] == f"synthetic failure of task {t['payload']['i']}"
        assert "RuntimeError" in t["traceback"]
    for t in tasks:
        if t["status"] == "WARNING":
            assert t["message"] == f"synthetic warning for task {t['payload']['i']}"


async def test_handler_errors_and_garbage_fail_the_task_with_a_message(
    db_url: str, conn: db.Connection, make_kind: Callable[..., Kind]
) -> None:
    kind = make_kind("misbehaving", max_attempts=1)
    one_task_per_item(kind)

    @kind.process
    async def process(task: herder.TaskContext) -> herder.JSON:
        what = task.payload["do"]
        if what == "raise":
            raise KeyError("patient_id")
        if what == "garbage":
            return {"at": object()}
        if what == "nan":
            return float("nan")
        if what == "warn":
            return herder.warn("2 documents unreadable", {"read": 8})
        return {"ok": True, "n": [1, 2]}

    items = [{"do": d} for d in ("raise", "garbage", "nan", "warn", "fine")]
    async with running_daemon(db_url):
        job = await wait_finished(conn, await submit(conn, "misbehaving", {"items": items}))
        good = await wait_finished(conn, await submit(conn, "synthetic", {"tasks": 3}))
    assert job["status"] == "FAILURE"
    assert good["status"] == "SUCCESS"
    by_do = {t["payload"]["do"]: t for t in await tasks_of(conn, job["id"])}
    assert by_do["raise"]["status"] == "FAILURE"
    assert by_do["raise"]["message"] == "'patient_id'"
    assert "KeyError" in by_do["raise"]["traceback"]
    for what in ("garbage", "nan"):
        assert by_do[what]["status"] == "FAILURE"
        assert "not JSON" in by_do[what]["message"]
    assert (by_do["warn"]["status"], by_do["warn"]["message"]) == (
        "WARNING",
        "2 documents unreadable",
    )
    assert by_do["warn"]["result"] == {"read": 8}
    assert (by_do["fine"]["status"], by_do["fine"]["result"]) == (
        "SUCCESS",
        {"ok": True, "n": [1, 2]},
    )


async def test_retries_back_off_then_give_up_at_max_attempts(
    db_url: str, conn: db.Connection, make_kind: Callable[..., Kind]
) -> None:
    kind = make_kind("stubborn", max_attempts=3, backoff=0.05, retry_on=(ConnectionError,))
    one_task_per_item(kind)

    @kind.process
    async def process(task: herder.TaskContext) -> herder.JSON:
        if task.payload["how"] == "retry":
            raise herder.Retry("upstream busy")
        if task.payload["how"] == "declared":
            raise ConnectionError("reset by peer")
        if task.attempt < 3:
            raise ConnectionError("flaps twice")
        return task.attempt

    items = [{"how": "retry"}, {"how": "declared"}, {"how": "recovers"}]
    async with running_daemon(db_url):
        job = await wait_finished(conn, await submit(conn, "stubborn", {"items": items}))
    tasks = {t["payload"]["how"]: t for t in await tasks_of(conn, job["id"])}
    assert tasks["retry"]["status"] == "FAILURE"
    assert tasks["retry"]["attempts"] == 3
    assert tasks["retry"]["message"] == "gave up after 3 attempts: upstream busy"
    assert tasks["declared"]["message"] == "gave up after 3 attempts: reset by peer"
    assert (tasks["recovers"]["status"], tasks["recovers"]["result"]) == ("SUCCESS", 3)
    assert job["status"] == "FAILURE"


async def test_a_hung_handler_times_out(
    db_url: str, conn: db.Connection, make_kind: Callable[..., Kind]
) -> None:
    kind = make_kind("hangs", timeout=0.2, max_attempts=2, backoff=0.01)
    one_task_per_item(kind)

    @kind.process
    async def process(task: herder.TaskContext) -> herder.JSON:
        await anyio.sleep_forever()

    async with running_daemon(db_url):
        job = await wait_finished(conn, await submit(conn, "hangs", {"items": [{}]}))
    [task] = await tasks_of(conn, job["id"])
    assert (task["status"], task["attempts"]) == ("FAILURE", 2)
    assert task["message"] == "gave up after 2 attempts: timed out after 0.2s"


async def test_a_timeout_error_raised_by_the_handler_is_an_ordinary_failure(
    db_url: str, conn: db.Connection, make_kind: Callable[..., Kind]
) -> None:
    kind = make_kind("upstream_timeout", max_attempts=3)
    one_task_per_item(kind)

    @kind.process
    async def process(task: herder.TaskContext) -> herder.JSON:
        raise TimeoutError("upstream API timed out")

    async with running_daemon(db_url):
        job = await wait_finished(conn, await submit(conn, "upstream_timeout", {"items": [{}]}))
    [task] = await tasks_of(conn, job["id"])
    assert (task["status"], task["attempts"]) == ("FAILURE", 1)
    assert task["message"] == "upstream API timed out"


async def test_cancel_reaches_running_tasks_within_a_second(
    db_url: str, conn: db.Connection, make_kind: Callable[..., Kind]
) -> None:
    kind = make_kind("long_running")
    one_task_per_item(kind)
    started = anyio.Event()
    cancelled: list[int] = []

    @kind.process
    async def process(task: herder.TaskContext) -> herder.JSON:
        started.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            cancelled.append(task.id)
            raise

    # Two daemons: the cancel must reach running tasks on every daemon of the fleet.
    async with (
        running_daemon(db_url, concurrency=2, prefetch=2),
        running_daemon(db_url, concurrency=2, prefetch=2),
    ):
        job_id = await submit(conn, "long_running", {"items": [{}] * 10})
        with anyio.fail_after(10):
            await started.wait()
        await wait_for(
            lambda: conn.fetchval(
                "SELECT count(*) = 4 FROM herder.tasks "
                "WHERE job_id = $1 AND status = 'IN_PROGRESS'",
                job_id,
            ),
            what="4 running tasks",
        )
        assert await conn.fetchval("SELECT herder.cancel_job($1)", job_id) is True
        assert (await job_row(conn, job_id))["status"] == "CANCELING"
        # cancel_job marks the job only; the daemons cancel what runs and what waits.
        job = await wait_finished(conn, job_id, timeout=1.0)
    assert job["status"] == "CANCELED"
    assert len(cancelled) == 4
    statuses = await conn.fetch("SELECT status, count(*) FROM herder.tasks GROUP BY status")
    assert {r["status"]: r["count"] for r in statuses} == {"CANCELED": 10}


async def test_a_late_result_never_overwrites_a_cancel(
    db_url: str, conn: db.Connection, make_kind: Callable[..., Kind]
) -> None:
    """A handler that ignores cancellation finishes after its job was canceled."""
    kind = make_kind("stubborn_finisher")
    one_task_per_item(kind)
    started, release = anyio.Event(), anyio.Event()

    @kind.process
    async def process(task: herder.TaskContext) -> herder.JSON:
        with anyio.CancelScope(shield=True):
            started.set()
            await release.wait()
        return {"late": True}

    async with running_daemon(db_url, concurrency=1, prefetch=1):
        job_id = await submit(conn, "stubborn_finisher", {"items": [{}, {}]})
        with anyio.fail_after(10):
            await started.wait()
        await conn.fetchval("SELECT herder.cancel_job($1)", job_id)
        release.set()
        job = await wait_finished(conn, job_id)
    assert job["status"] == "CANCELED"


async def test_stale_outcomes_are_fenced_out(store: Store, conn: db.Connection) -> None:
    """Every write names the attempt it belongs to; once the task moved on, it is ignored."""
    job_id = await store.submit("synthetic", {"tasks": 1})
    await conn.execute(
        "INSERT INTO herder.tasks (job_id, seq, payload) VALUES ($1, 0, '{}')", job_id
    )
    await conn.execute("UPDATE herder.jobs SET status = 'PENDING', prepared_at = now()")
    [first] = await store.claim_tasks(10, "worker-a", 0.05)
    assert first.attempts == 1
    # worker-a's lease runs out; the rescue hands the task back and worker-b claims it.
    await wait_for(lambda: store.rescue_expired_tasks("sweeper"), what="the lease to expire")
    [second] = await store.claim_tasks(10, "worker-b", 30)
    assert (second.id, second.attempts) == (first.id, 2)
    late = Outcome(first.id, job_id, first.attempts, "SUCCESS", result_json='{"from": "a"}')
    assert await store.complete_tasks([late]) == []
    task = await conn.fetchrow("SELECT status, worker, result FROM herder.tasks")
    assert task is not None
    assert (task["status"], task["worker"], task["result"]) == ("IN_PROGRESS", "worker-b", None)
    # Canceling the job and then finishing: the task stays as cancel left it.
    await conn.fetchval("SELECT herder.cancel_job($1)", job_id)
    on_time = Outcome(second.id, job_id, second.attempts, "CANCELED", "canceled while running")
    assert await store.complete_tasks([on_time]) == [(second.id, job_id)]
    assert await store.complete_tasks([on_time]) == []  # a repeat changes nothing
    [settled] = await store.settle_jobs([job_id])
    assert settled.settlement.status == "CANCELED"


async def test_last_two_tasks_finishing_together_settle_the_job_once(
    db_url: str, conn: db.Connection, make_kind: Callable[..., Kind]
) -> None:
    """Two daemons each hold one of a job's two tasks; both finish at the same instant."""
    await conn.execute(SETTLEMENT_LOG)
    kind = make_kind("pairs")
    one_task_per_item(kind)
    arrived: dict[int, int] = {}
    both: dict[int, anyio.Event] = {}
    hooks: list[int] = []

    @kind.process
    async def process(task: herder.TaskContext) -> herder.JSON:
        arrived[task.job_id] = arrived.get(task.job_id, 0) + 1
        event = both.setdefault(task.job_id, anyio.Event())
        if arrived[task.job_id] == 2:
            event.set()
        await event.wait()
        return None

    @kind.on_finished
    async def finished(job: herder.FinishedJob) -> None:
        hooks.append(job.id)

    listener = await db.connect(db_url)
    notified: list[str] = []
    await listener.add_listener("herder_job_finished", lambda *a: notified.append(a[3]))
    jobs = 20
    try:
        async with (
            running_daemon(db_url, concurrency=1, prefetch=1),
            running_daemon(db_url, concurrency=1, prefetch=1),
        ):
            # One job at a time: with two jobs live, each daemon could hold the first task
            # of a different job and wait forever for its partner.
            ids = []
            for _ in range(jobs):
                ids.append(await submit(conn, "pairs", {"items": [{}, {}]}))
                assert (await wait_finished(conn, ids[-1]))["status"] == "SUCCESS"

            async def all_hooks_ran() -> bool:
                return len(hooks) >= jobs

            await wait_for(all_hooks_ran, what="every on_finished hook")
        await listener.fetchval("SELECT 1")
    finally:
        await listener.close()
    settlements = await conn.fetch(
        "SELECT job_id, count(*) AS n FROM public.settlements GROUP BY job_id"
    )
    assert sorted(r["job_id"] for r in settlements) == sorted(ids)
    assert {r["n"] for r in settlements} == {1}
    assert sorted(hooks) == sorted(ids)
    assert sorted(int(n) for n in notified) == sorted(ids)


async def test_prefetch_holds_about_a_second_of_work(store: Store) -> None:
    """Deep for short tasks (a claim always in flight), shallow for long ones (a fleet
    shares them), unless --prefetch fixes it. An unmeasured kind counts a whole second."""
    worker = Worker(store, "w", metrics=Metrics(), concurrency=10, lease=30, poll_interval=1)
    assert worker.room()[0] == 10  # nothing measured yet: one task per executor
    expected = {10.0: 1, 1.0: 10, 0.1: 100, 0.01: 1000, 0.00001: 2000}  # two batches at most
    for seconds, room in expected.items():
        worker._next_task_seconds = seconds
        assert worker.room()[0] == room, seconds
    fixed = Worker(
        store, "w", metrics=Metrics(), concurrency=10, lease=30, poll_interval=1, prefetch=7
    )
    fixed._next_task_seconds = 0.00001
    assert fixed.room()[0] == 7


async def test_one_completion_batch_mixing_plain_and_detailed_outcomes(store: Store) -> None:
    """Plain successes and outcomes with a message, result or retry go by different
    statements; both are fenced by attempt, and only what applied is reported."""
    job_id = await store.submit("synthetic", {"tasks": 5})
    await store.pool.execute(
        "INSERT INTO herder.tasks (job_id, seq) SELECT $1, i FROM generate_series(0, 4) i",
        job_id,
    )
    await store.pool.execute("UPDATE herder.jobs SET status = 'PENDING' WHERE id = $1", job_id)
    a, b, c, d, e = sorted(await store.claim_tasks(5, "w", 30), key=lambda t: t.seq)
    applied = await store.complete_tasks(
        [
            Outcome(a.id, job_id, a.attempts, "SUCCESS"),
            Outcome(b.id, job_id, b.attempts, "SUCCESS", result_json='{"n": 1}'),
            Outcome(c.id, job_id, c.attempts, "WARNING", "careful"),
            Outcome(d.id, job_id, d.attempts + 1, "SUCCESS"),  # a stale attempt
            Outcome(e.id, job_id, e.attempts, "PENDING", "try again", delay=60),
        ]
    )
    assert sorted(applied) == sorted((t.id, job_id) for t in (a, b, c, e))
    rows = {
        r["id"]: r
        for r in await store.pool.fetch("SELECT * FROM herder.tasks WHERE job_id = $1", job_id)
    }
    assert (rows[a.id]["status"], rows[a.id]["message"], rows[a.id]["worker"]) == (
        "SUCCESS",
        None,
        None,
    )
    assert rows[a.id]["ended_at"] is not None
    assert (rows[b.id]["status"], rows[b.id]["result"]) == ("SUCCESS", {"n": 1})
    assert (rows[c.id]["status"], rows[c.id]["message"]) == ("WARNING", "careful")
    assert rows[d.id]["status"] == "IN_PROGRESS"
    assert (rows[e.id]["status"], rows[e.id]["ended_at"]) == ("PENDING", None)
    assert rows[e.id]["run_at"] is not None


async def test_a_new_kind_after_a_run_of_no_ops_is_not_hoarded(
    db_url: str, conn: db.Connection, make_kind: Callable[..., Kind]
) -> None:
    """What the daemon learned of no-op tasks says nothing of a kind it has not measured:
    a claim that brings 100 ms tasks keeps about a second of them per executor and hands
    the rest back at once, for an idle daemon to take."""
    slow = make_kind("slow-after-fast")
    one_task_per_item(slow)

    @slow.process
    async def process(task: herder.TaskContext) -> herder.JSON:
        await anyio.sleep(0.1)
        return None

    async with running_daemon(db_url, concurrency=10) as daemon:
        await wait_finished(conn, await submit(conn, "synthetic", {"tasks": 5000}))
        job_id = await submit(conn, "slow-after-fast", {"items": [{}] * 1000})

        async def held() -> int | None:
            n: int = await conn.fetchval(
                "SELECT count(*) FROM herder.tasks WHERE job_id = $1 AND status <> 'PENDING'",
                job_id,
            )
            return n if n >= 10 else None

        await wait_for(held, what="the slow tasks to start")
        most = 0
        for _ in range(20):
            most = max(most, len(daemon.worker.held))
            await anyio.sleep(0.05)
        await conn.execute("SELECT herder.cancel_job($1)", job_id)
    assert most <= 150, most  # about 100 (a second per executor), never hundreds


async def test_tasks_of_a_kind_that_slowed_down_are_handed_back_not_hoarded(
    db_url: str, conn: db.Connection
) -> None:
    """The same kind, first instant, then 100 ms a task: the daemon claimed two batches
    while the kind looked instant, and hands back what it cannot run within about a
    second once it has measured the slower tasks."""
    async with running_daemon(db_url, concurrency=10) as daemon:
        await wait_finished(conn, await submit(conn, "synthetic", {"tasks": 5000}))
        job_id = await submit(conn, "synthetic", {"tasks": 2000, "task_ms": 100})

        async def claimed() -> bool:
            return len(daemon.worker.held) > 150  # the claim made while it looked instant

        async def handed_back() -> bool:
            return len(daemon.worker.held) <= 150

        await wait_for(claimed, what="the slow tasks to be claimed")
        await wait_for(handed_back, timeout=2, what="the excess to be handed back")
        most = 0
        for _ in range(20):
            most = max(most, len(daemon.worker.held))
            await anyio.sleep(0.05)
        await conn.execute("SELECT herder.cancel_job($1)", job_id)
    assert most <= 150, most
