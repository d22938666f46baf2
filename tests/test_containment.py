"""Containment: nothing a job, a payload, a handler or another role does can stop or fool
a daemon.

One regression test (or a few) per numbered case of containment, ``test_caseNN_...``,
then further attacker tests, ``test_extra_...``. Everything runs against real
PostgreSQL and real daemons (in-process, or ``herder run`` processes where a handler may
take the whole process down), and is judged from the database's rows. Each test also
checks that the daemon still serves: an innocent job settles SUCCESS afterwards.
"""

from __future__ import annotations

import itertools
import math
import os
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import asyncpg
import pytest

import herder
from herder import db
from herder.daemon import Daemon, DaemonConfig
from herder.kinds import Kind, KindError, unregister
from herder.preparation import Batch, OrderedWriter
from herder.store import Store
from tests.support import (
    DaemonProcess,
    Login,
    as_role,
    one_task_per_item,
    running_daemon,
    submit,
    tasks_of,
    wait_finished,
    wait_for,
)

_names = itertools.count()
Daemons = Callable[..., DaemonProcess]

#: Daemon settings that keep every test short: leases and polls well under a second.
FAST: dict[str, Any] = {"lease_seconds": 2.0, "poll_interval": 0.1}
FAST_CLI = ("--lease-seconds", "2", "--poll-interval", "0.1", "--health-addr", "127.0.0.1:0")


# ---------------------------------------------------------------- helpers


async def job_state(conn: db.Connection, job_id: int) -> dict[str, Any]:
    """The job's row without its payload (which some tests make undecodable on purpose)."""
    row = await conn.fetchrow(
        "SELECT id, status, message, started_at, ended_at FROM herder.jobs WHERE id = $1",
        job_id,
    )
    assert row is not None, f"job {job_id} does not exist"
    return dict(row)


async def wait_settled(
    conn: db.Connection, job_id: int, timeout: float = 10.0, *, after: datetime | None = None
) -> dict[str, Any]:
    """Wait until the job is settled (and, with ``after``, settled again since then)."""

    async def settled() -> dict[str, Any] | None:
        row = await job_state(conn, job_id)
        if row["status"] not in ("SUCCESS", "WARNING", "FAILURE", "CANCELED"):
            return None
        if after is not None and (row["ended_at"] is None or row["ended_at"] <= after):
            return None
        return row

    return await wait_for(settled, timeout=timeout, what=f"job {job_id} to settle")


async def wait_status(conn: db.Connection, job_id: int, status: str, timeout: float = 10.0) -> None:
    async def reached() -> bool:
        now: str = (await job_state(conn, job_id))["status"]
        return now == status

    await wait_for(reached, timeout=timeout, what=f"job {job_id} to be {status}")


async def assert_still_serving(conn: db.Connection) -> None:
    """The daemon is alive and serving: an innocent job submitted now settles SUCCESS."""
    job_id = await submit(conn, "synthetic", {"tasks": 3})
    job = await wait_settled(conn, job_id)
    assert (job["status"], job["message"]) == ("SUCCESS", "3 of 3 tasks succeeded")


def write_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str) -> str:
    """Write an app module that ``herder run --app`` subprocesses (and this process) can
    import; return its module name."""
    name = f"contain_app_{os.getpid()}_{next(_names)}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


async def alive(process: DaemonProcess) -> bool:
    return process.proc.poll() is None


async def task_rows_touched_by(conn: db.Connection, statement: str, *args: Any) -> int:
    """Run ``statement`` (which must answer true) in a transaction of its own; return how
    many task rows it inserted, updated or deleted. pg_stat_xact_user_tables also counts
    what earlier transactions of the session left unreported, hence the difference taken
    inside the transaction (statistics are reported only between transactions)."""
    count = (
        "SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0)::bigint "
        "FROM pg_stat_xact_user_tables WHERE relid = 'herder.tasks'::regclass"
    )
    async with conn.transaction():
        before: int = await conn.fetchval(count)
        assert await conn.fetchval(statement, *args) is True
        after: int = await conn.fetchval(count)
    return after - before


async def wait_settled_in(
    daemon: DaemonProcess, conn: db.Connection, job_id: int, timeout: float = 10.0
) -> dict[str, Any]:
    """wait_settled, failing at once (with the daemon's log) if the daemon exits."""

    async def settled() -> dict[str, Any] | None:
        if daemon.proc.poll() is not None:
            raise AssertionError(
                f"the daemon exited ({daemon.proc.returncode}):\n{daemon.log[-4000:]}"
            )
        row = await job_state(conn, job_id)
        return row if row["status"] in ("SUCCESS", "WARNING", "FAILURE", "CANCELED") else None

    return await wait_for(settled, timeout=timeout, what=f"job {job_id} to settle")


# ---------------------------------------------------------------- case 1


DEEP = "[" * 3000 + "]" * 3000


@pytest.mark.parametrize("payload", ['{"tasks": 1e5000}', DEEP], ids=["1e5000", "nested-3000"])
async def test_case01_a_payload_python_cannot_decode_fails_its_job_only(
    db_url: str, conn: db.Connection, login: Login, payload: str
) -> None:
    """Case 1: one INSERT by a herder_submitter of a payload PostgreSQL accepts and
    Python's json refuses (a 5,001-digit integer, or nesting deeper than the recursion
    limit) used to crash every daemon that claimed it. Now the job fails with a message
    saying so, and an innocent job submitted alongside settles."""
    _, mallory = await login("herder_submitter")
    bad = await mallory.fetchval(
        "INSERT INTO herder.jobs (kind, payload) VALUES ('synthetic', $1::text::jsonb) "
        "RETURNING id",
        payload,
    )
    innocent = await submit(conn, "synthetic", {"tasks": 5})
    async with running_daemon(db_url, **FAST):
        failed = await wait_settled(conn, bad)
        ok = await wait_settled(conn, innocent)
        await assert_still_serving(conn)
    assert failed["status"] == "FAILURE"
    assert failed["message"].startswith("payload cannot be decoded:"), failed["message"]
    assert await conn.fetchval("SELECT count(*) FROM herder.tasks WHERE job_id = $1", bad) == 0
    assert ok["status"] == "SUCCESS"


# ---------------------------------------------------------------- case 2


@pytest.mark.parametrize(
    ("raised", "stored"),
    [("bad\x00byte", "bad\ufffdbyte"), ("bad\ud800byte", "bad\ufffdbyte")],
    ids=["nul", "lone-surrogate"],
)
async def test_case02_an_exception_message_postgres_refuses_fails_only_its_task(
    db_url: str, conn: db.Connection, make_kind: Callable[..., Kind], raised: str, stored: str
) -> None:
    """Case 2: a task raising ValueError("bad\\x00byte") killed the completer, hence the
    daemon, and every task of other jobs it held lost an attempt ("worker lost"). Now
    the task fails with the text made storable, and the tasks held alongside finish on
    their first attempt."""
    kind = make_kind("nul_raiser", max_attempts=1)
    one_task_per_item(kind)
    release = anyio.Event()

    @kind.process
    async def process(task: herder.TaskContext) -> herder.JSON:
        if task.payload["do"] == "raise":
            raise ValueError(raised)
        await release.wait()
        return {"ok": task.seq}

    async with running_daemon(db_url, **FAST):
        held = await submit(conn, "nul_raiser", {"items": [{"do": "wait"}] * 4})

        async def all_running() -> bool:
            n = await conn.fetchval(
                "SELECT count(*) FROM herder.tasks WHERE job_id = $1 AND status = 'IN_PROGRESS'",
                held,
            )
            return bool(n == 4)

        await wait_for(all_running, what="the innocent job's tasks to run")
        bad = await submit(conn, "nul_raiser", {"items": [{"do": "raise"}]})
        failed = await wait_settled(conn, bad)
        release.set()
        innocent = await wait_settled(conn, held)
        await assert_still_serving(conn)
    assert failed["status"] == "FAILURE"
    [task] = await tasks_of(conn, bad)
    assert (task["status"], task["message"]) == ("FAILURE", stored)
    assert "ValueError" in task["traceback"]
    assert "\x00" not in task["traceback"]
    assert innocent["status"] == "SUCCESS"
    for t in await tasks_of(conn, held):
        assert (t["status"], t["attempts"]) == ("SUCCESS", 1), t["message"]


# ---------------------------------------------------------------- case 3


async def test_case03_a_kind_without_prepare_runs_each_job_as_one_task(
    db_url: str, conn: db.Connection, make_kind: Callable[..., Kind]
) -> None:
    """Case 3: a kind declared without ``prepare`` stopped the daemon when its first job
    arrived. The contract (section 4): each job runs as one task whose payload is the
    job's payload."""
    kind = make_kind("unprepared")

    @kind.process
    async def process(task: herder.TaskContext) -> herder.JSON:
        return {"got": task.payload}

    payload = {"x": [1, 2], "name": "single"}
    async with running_daemon(db_url, **FAST):
        job_id = await submit(conn, "unprepared", payload)
        innocent = await submit(conn, "synthetic", {"tasks": 2})
        job = await wait_settled(conn, job_id)
        assert (await wait_settled(conn, innocent))["status"] == "SUCCESS"
        await assert_still_serving(conn)
    assert job["status"] == "SUCCESS"
    [task] = await tasks_of(conn, job_id)
    assert (task["seq"], task["payload"], task["status"]) == (0, payload, "SUCCESS")
    assert task["result"] == {"got": payload}


# ---------------------------------------------------------------- case 4


async def test_case04_a_lease_that_ran_out_while_its_task_runs_is_not_rescued_by_its_holder(
    db_url: str, conn: db.Connection, make_kind: Callable[..., Kind]
) -> None:
    """Case 4: when renewals could not happen for longer than the lease (a row lock, an
    outage), the daemon rescued and re-claimed its *own* running task; its two attempts,
    keyed by task id alone, tangled and the daemon died with KeyError. A daemon never
    rescues what it still holds: the task finishes on its first attempt."""
    kind = make_kind("steady", max_attempts=3)
    one_task_per_item(kind)
    release = anyio.Event()
    attempts: list[int] = []

    @kind.process
    async def process(task: herder.TaskContext) -> herder.JSON:
        attempts.append(task.attempt)
        await release.wait()
        return None

    async with running_daemon(db_url, lease_seconds=1.5, poll_interval=0.1):
        job_id = await submit(conn, "steady", {"items": [{}]})

        async def running() -> bool:
            return bool(attempts)

        await wait_for(running, what="the task to start")
        # Renewals that cannot happen: for longer than a lease, the lease in the database
        # keeps running out while the handler still runs (the sweep runs every 0.1 s).
        window = time.monotonic() + 2.0
        while time.monotonic() < window:
            await conn.execute(
                "UPDATE herder.tasks SET lease_until = clock_timestamp() - interval '1 s' "
                "WHERE job_id = $1 AND status = 'IN_PROGRESS' AND attempts = 1",
                job_id,
            )
            await anyio.sleep(0.05)
        release.set()
        job = await wait_settled(conn, job_id)
        await assert_still_serving(conn)
    assert job["status"] == "SUCCESS"
    [task] = await tasks_of(conn, job_id)
    assert (task["status"], task["attempts"], task["message"]) == ("SUCCESS", 1, None)
    assert attempts == [1]


# ---------------------------------------------------------------- case 5


async def test_case05_a_transient_failure_marking_jobs_started_strands_no_task(
    db_url: str, conn: db.Connection
) -> None:
    """Case 5: the claimer recorded tasks as held before marking their job started; when
    that write failed transiently the tasks were never run and the heartbeat renewed
    their leases forever. Here another session holds the job row so the write waits,
    and that waiting backend is terminated (a transient error): the job still runs to
    SUCCESS, spending no attempt for nothing."""
    job_id: int = await conn.fetchval(
        "INSERT INTO herder.jobs (kind, payload, status, prepared, prepared_at) "
        "VALUES ('synthetic', '{\"tasks\": 3}', 'PENDING', 3, clock_timestamp()) RETURNING id"
    )
    await conn.execute(
        "INSERT INTO herder.tasks (job_id, seq, payload) "
        "SELECT $1, i, jsonb_build_object('i', i) FROM generate_series(0, 2) i",
        job_id,
    )
    locker = await db.connect(db_url)
    try:
        transaction = locker.transaction()
        await transaction.start()
        await locker.execute("SELECT 1 FROM herder.jobs WHERE id = $1 FOR SHARE", job_id)
        locker_pid = await locker.fetchval("SELECT pg_backend_pid()")
        async with running_daemon(db_url, lease_seconds=1.0, poll_interval=0.1):

            async def blocked() -> int | None:
                pid: int | None = await conn.fetchval(
                    "SELECT pid FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid)) "
                    "LIMIT 1",
                    locker_pid,
                )
                return pid

            waiting = await wait_for(blocked, timeout=5, what="the daemon to write the job")
            assert await conn.fetchval("SELECT pg_terminate_backend($1)", waiting)
            await transaction.commit()
            job = await wait_settled(conn, job_id, timeout=8)
            await assert_still_serving(conn)
    finally:
        await locker.close()
    assert job["status"] == "SUCCESS"
    for task in await tasks_of(conn, job_id):
        assert (task["status"], task["attempts"]) == ("SUCCESS", 1)


# ---------------------------------------------------------------- case 6


def hooked_kind(
    make_kind: Callable[..., Kind], name: str
) -> tuple[list[tuple[int, str]], dict[str, bool], anyio.Event]:
    """A kind whose tasks fail while ``state['failing']`` and whose hook records each run
    (job id, status) and, for a job whose payload says ``block``, waits for the gate."""
    kind = make_kind(name, max_attempts=1)
    one_task_per_item(kind)
    runs: list[tuple[int, str]] = []
    state = {"failing": True}
    gate = anyio.Event()

    @kind.process
    async def process(task: herder.TaskContext) -> herder.JSON:
        if task.payload.get("fail") and state["failing"]:
            raise RuntimeError("failing for now")
        return None

    @kind.on_finished
    async def finished(job: herder.FinishedJob) -> None:
        runs.append((job.id, job.status))
        if job.payload.get("block"):
            await gate.wait()

    return runs, state, gate


async def test_case06_a_hook_longer_than_the_lease_runs_once_on_two_daemons(
    db_url: str, conn: db.Connection, make_kind: Callable[..., Kind]
) -> None:
    """Case 6: nothing renewed a hook's lease, so a hook longer than the lease ran on two
    daemons at once. Each settlement gets exactly one on_finished run."""
    kind = make_kind("slow_hook")
    one_task_per_item(kind)
    starts: list[int] = []
    ends: list[int] = []

    @kind.process
    async def process(task: herder.TaskContext) -> herder.JSON:
        return None

    @kind.on_finished
    async def finished(job: herder.FinishedJob) -> None:
        starts.append(job.id)
        await anyio.sleep(2.5)  # the hook's own duration: over twice the lease
        ends.append(job.id)

    async with (
        running_daemon(db_url, lease_seconds=1.0, poll_interval=0.1),
        running_daemon(db_url, lease_seconds=1.0, poll_interval=0.1),
    ):
        job_id = await submit(conn, "slow_hook", {"items": [{}]})
        assert (await wait_settled(conn, job_id))["status"] == "SUCCESS"

        async def hook_done() -> bool:
            return bool(ends)

        await wait_for(hook_done, what="the hook to finish")
        assert starts == [job_id]
        await assert_still_serving(conn)
    assert starts == [job_id]


async def test_case06_a_settlement_during_a_running_hook_gets_its_own_run(
    db_url: str, conn: db.Connection, make_kind: Callable[..., Kind]
) -> None:
    """Case 6: retry_job while the hook runs, then a second FAILURE settlement: the first
    hook's completion cleared the second's pending flag (two settlements, one run)."""
    runs, _, gate = hooked_kind(make_kind, "rehooked")
    async with running_daemon(db_url, **FAST):
        job_id = await submit(conn, "rehooked", {"items": [{"fail": True}], "block": True})
        first = await wait_settled(conn, job_id)
        assert first["status"] == "FAILURE"

        async def hook_running() -> bool:
            return len(runs) == 1

        await wait_for(hook_running, what="the first hook to start")
        assert await conn.fetchval("SELECT herder.retry_job($1)", job_id) is True
        second = await wait_settled(conn, job_id, after=first["ended_at"])
        assert second["status"] == "FAILURE"
        gate.set()

        async def both_ran() -> bool:
            return len(runs) >= 2

        await wait_for(both_ran, timeout=5, what="the second settlement's hook")
        await assert_still_serving(conn)
    assert runs == [(job_id, "FAILURE"), (job_id, "FAILURE")]


@pytest.mark.parametrize("action", ["retry", "restart"])
async def test_case06_retry_and_restart_never_drop_a_hook_not_yet_run(
    db_url: str, conn: db.Connection, make_kind: Callable[..., Kind], action: str
) -> None:
    """Case 6: retry_job and restart_job dropped a hook not yet run. Here the hook
    runner is busy with another job's hook while the job settles FAILURE, is retried
    (or restarted) and settles SUCCESS: both settlements get their run."""
    runs, state, gate = hooked_kind(make_kind, f"kept_hook_{action}")
    kind = f"kept_hook_{action}"
    async with running_daemon(db_url, **FAST):
        busy = await submit(conn, kind, {"items": [{}], "block": True})

        async def runner_busy() -> bool:
            return (busy, "SUCCESS") in runs

        await wait_for(runner_busy, what="the blocking hook to start")
        job_id = await submit(conn, kind, {"items": [{"fail": True}, {}]})
        first = await wait_settled(conn, job_id)
        assert first["status"] == "FAILURE"
        state["failing"] = False
        assert await conn.fetchval(f"SELECT herder.{action}_job($1)", job_id) is True
        second = await wait_settled(conn, job_id, after=first["ended_at"])
        assert second["status"] == "SUCCESS"
        gate.set()

        async def both_ran() -> bool:
            return len([r for r in runs if r[0] == job_id]) >= 2

        await wait_for(both_ran, timeout=5, what="a hook run for each settlement")
        await assert_still_serving(conn)
    assert sorted(status for j, status in runs if j == job_id) == ["FAILURE", "SUCCESS"]


# ---------------------------------------------------------------- case 7


async def test_case07_cancel_then_resume_during_a_slow_preparation(
    db_url: str, conn: db.Connection, make_kind: Callable[..., Kind]
) -> None:
    """Case 7: cancel, then resume, during a slow preparation: the old preparation (same
    daemon, same generation) passed the fence and wrote the tasks, the new one was
    refused, the daemon died with KeyError and the job stayed PENDING forever. Without
    LISTEN (behind a pooler) nothing interrupts the old preparation early. Now the job
    ends SUCCESS with exactly its tasks."""
    kind = make_kind("gated_prepare")
    calls: list[int] = []
    gate = anyio.Event()

    @kind.prepare
    async def prepare(job: herder.JobContext) -> AsyncIterator[herder.JSON]:
        calls.append(job.id)
        for i in range(5):
            if i == 1:
                await gate.wait()
            yield {"i": i}

    @kind.process
    async def process(task: herder.TaskContext) -> herder.JSON:
        return None

    async with running_daemon(db_url, listen=False, lease_seconds=2.0, poll_interval=0.1):
        job_id = await submit(conn, "gated_prepare", {})

        async def preparing() -> bool:
            return len(calls) == 1

        await wait_for(preparing, what="the preparation to start")
        assert await conn.fetchval("SELECT herder.cancel_job($1)", job_id) is True
        await wait_status(conn, job_id, "CANCELED")
        assert await conn.fetchval("SELECT herder.resume_job($1)", job_id) is True

        async def prepared_again() -> bool:
            return len(calls) >= 2

        await wait_for(prepared_again, what="the resumed preparation to start")
        gate.set()
        job = await wait_settled(conn, job_id)
        await assert_still_serving(conn)
    assert job["status"] == "SUCCESS"
    tasks = await tasks_of(conn, job_id)
    assert [(t["seq"], t["payload"], t["status"]) for t in tasks] == [
        (i, {"i": i}, "SUCCESS") for i in range(5)
    ]


# ---------------------------------------------------------------- case 8


async def test_case08_a_notify_from_any_login_does_not_stall_a_preparation(
    db_url: str, conn: db.Connection, make_kind: Callable[..., Kind], login: Login
) -> None:
    """Case 8: ``NOTIFY herder_cancel, '<id>'`` from a role that cannot even see the job
    restarted that job's preparation (a lease lost each time). A notification only
    wakes: the job is not canceled, so its preparation goes on, once."""
    kind = make_kind("slow_prepare")
    calls: list[int] = []

    @kind.prepare
    async def prepare(job: herder.JobContext) -> AsyncIterator[herder.JSON]:
        calls.append(job.id)
        for i in range(job.resume_from, 12):
            await anyio.sleep(0.1)
            yield {"i": i}

    @kind.process
    async def process(task: herder.TaskContext) -> herder.JSON:
        return None

    _, stranger = await login()  # no herder role at all
    async with running_daemon(db_url, lease_seconds=1.0, poll_interval=0.1):
        job_id = await submit(conn, "slow_prepare", {})

        async def preparing() -> bool:
            return bool(calls)

        await wait_for(preparing, what="the preparation to start")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await stranger.fetchval("SELECT count(*) FROM herder.jobs")
        for _ in range(3):
            await stranger.execute(f"NOTIFY herder_cancel, '{job_id}'")
        job = await wait_settled(conn, job_id)
        await assert_still_serving(conn)
    assert job["status"] == "SUCCESS"
    assert calls == [job_id]
    tasks = await tasks_of(conn, job_id)
    assert [t["seq"] for t in tasks] == list(range(12))


# ---------------------------------------------------------------- case 9


async def test_case09_a_stale_preparer_cannot_fail_a_job_another_daemon_holds(
    conn: db.Connection, store: Store
) -> None:
    """Case 9: the preparation-failure write had no fence on the holder: a preparer
    whose lease ran out (another daemon now prepares the job) could fail the job and
    delete the new holder's tasks. Now it writes nothing."""
    job_id = await submit(conn, "synthetic", {"tasks": 2})
    [stale] = await store.claim_preparations("daemon-a", 0.05)
    assert stale.id == job_id

    async def taken_over() -> Any:
        return await store.claim_preparations("daemon-b", 30.0)

    [fresh] = await wait_for(taken_over, timeout=5, what="daemon-a's lease to run out")
    assert fresh.id == job_id
    batch = Batch([(job_id, 0, db.encode_json({"i": 0}))], 0, last=False, previous=None)
    assert await OrderedWriter(store, "daemon-b", 30.0, fresh, max_attempts=3).write(batch)
    refused = await store.fail_preparation(
        stale, "daemon-a", "prepare failed: too late", run_hook=True
    )
    assert refused is False
    row = await conn.fetchrow(
        "SELECT status, message, preparer FROM herder.jobs WHERE id = $1", job_id
    )
    assert row is not None
    assert (row["status"], row["message"], row["preparer"]) == ("PREPARING", None, "daemon-b")
    assert await conn.fetchval("SELECT count(*) FROM herder.tasks WHERE job_id = $1", job_id) == 1


# ---------------------------------------------------------------- case 10


SHADOWS = """
CREATE FUNCTION {schema}.octet_length(text) RETURNS integer
    LANGUAGE sql IMMUTABLE AS 'SELECT 0';
CREATE FUNCTION {schema}.pg_has_role(name, text, text) RETURNS boolean
    LANGUAGE sql STABLE AS 'SELECT true';
CREATE FUNCTION {schema}.pg_has_role(name, name, text) RETURNS boolean
    LANGUAGE sql STABLE AS 'SELECT true';
CREATE FUNCTION {schema}.pg_has_role(text, text) RETURNS boolean
    LANGUAGE sql STABLE AS 'SELECT true';
SET search_path = {schema}, pg_catalog, public;
"""


async def test_case10_a_submitter_shadowing_built_ins_still_meets_the_limits(
    conn: db.Connection, login: Login
) -> None:
    """Case 10: a submitter who owns a schema put functions shadowing octet_length and
    pg_has_role first on its search_path, and the limits trigger (which did not pin its
    own) let an oversized payload and a priority above the cap through."""
    await conn.execute("UPDATE herder.settings SET value = 100 WHERE name = 'max_payload_bytes'")
    name, mallory = await login("herder_submitter")
    await conn.execute(f"CREATE SCHEMA {name} AUTHORIZATION {name}")
    await mallory.execute(SHADOWS.format(schema=name))
    assert await mallory.fetchval("SELECT octet_length('abc'::text)") == 0  # shadowed indeed
    with pytest.raises(asyncpg.CheckViolationError, match="max_payload_bytes"):
        await mallory.execute(
            "INSERT INTO herder.jobs (kind, payload) VALUES ('synthetic', $1)", {"x": "y" * 200}
        )
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="herder_urgent"):
        await mallory.execute("SELECT herder.submit_job('synthetic', '{}', 11)")
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="herder_urgent"):
        await mallory.execute(
            "INSERT INTO herder.jobs (kind, payload, priority) VALUES ('synthetic', '{}', 11)"
        )
    assert await conn.fetchval("SELECT count(*) FROM herder.jobs") == 0


async def test_extra_every_herder_function_pins_its_search_path(conn: db.Connection) -> None:
    """Case 10 (3.10): every function and trigger function in schema herder behaves the
    same whatever the session's search_path: each pins it."""
    rows = await conn.fetch(
        "SELECT p.oid::regprocedure::text AS name, p.proconfig FROM pg_proc p "
        "WHERE p.pronamespace = 'herder'::regnamespace ORDER BY 1"
    )
    assert rows
    unpinned = [
        r["name"]
        for r in rows
        if not any(c.startswith("search_path=") for c in (r["proconfig"] or []))
    ]
    assert unpinned == []


async def test_extra_a_daemon_role_whose_search_path_shadows_built_ins_runs_jobs_right(
    db_url: str, conn: db.Connection, login: Login
) -> None:
    """A role's session settings are a boundary too: the daemon's login role has a
    search_path whose first schema shadows clock_timestamp() with a clock stuck in 2000.
    herder's own sessions pin their search_path, so jobs start, finish and are timed by
    the real clock."""
    name, _ = await login("herder_worker")
    await conn.execute(f"CREATE SCHEMA shadow_{name}")
    await conn.execute(f"GRANT USAGE ON SCHEMA shadow_{name} TO {name}")
    await conn.execute(
        f"CREATE FUNCTION shadow_{name}.clock_timestamp() RETURNS timestamptz "
        "LANGUAGE sql AS $$ SELECT timestamptz '2000-01-01' $$"
    )
    await conn.execute(f"ALTER ROLE {name} SET search_path = shadow_{name}, pg_catalog")
    try:
        async with running_daemon(as_role(db_url, name), **FAST):
            job = await wait_finished(conn, await submit(conn, "synthetic", {"tasks": 20}))
        assert job["status"] == "SUCCESS"
        assert job["started_at"] >= job["created_at"]
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM herder.tasks WHERE job_id = $1 AND attempts = 1 "
                "AND started_at >= $2",
                job["id"],
                job["created_at"],
            )
            == 20
        )
    finally:
        await conn.execute(f"DROP SCHEMA shadow_{name} CASCADE")


# ---------------------------------------------------------------- case 11


@pytest.mark.parametrize("back", ["resume", "restart"])
async def test_case11_cancel_then_resume_or_restart_keeps_a_job_unverified(
    db_url: str, conn: db.Connection, login: Login, back: str
) -> None:
    """Case 11: an UNVERIFIED job canceled and then resumed went to PREPARING, bypassing
    approval. Cancel then resume (or restart) brings it back to UNVERIFIED; only a
    verification lets it run."""
    _, alice = await login("herder_submitter")
    job_id = await alice.fetchval(
        "INSERT INTO herder.jobs (kind, payload, status) "
        "VALUES ('synthetic', '{\"tasks\": 2}', 'UNVERIFIED') RETURNING id"
    )
    async with running_daemon(db_url, **FAST):
        assert await alice.fetchval("SELECT herder.cancel_job($1)", job_id) is True
        await wait_status(conn, job_id, "CANCELED")
        assert await alice.fetchval(f"SELECT herder.{back}_job($1)", job_id) is True
        assert (await job_state(conn, job_id))["status"] == "UNVERIFIED"
        assert (
            await conn.fetchval("SELECT count(*) FROM herder.tasks WHERE job_id = $1", job_id) == 0
        )
        assert await conn.fetchval("SELECT herder.verify_job($1)", job_id) is True  # superuser
        job = await wait_settled(conn, job_id)
    assert job["status"] == "SUCCESS"


async def test_case11_only_a_herder_verifier_may_verify(
    db_url: str, conn: db.Connection, login: Login
) -> None:
    """Case 11 and section 7: an owner could verify its own job. Only a member of
    herder_verifier (or a superuser) can."""
    _, alice = await login("herder_submitter")
    _, bob = await login("herder_submitter")
    _, victor = await login("herder_verifier")
    assert await conn.fetchval(
        "SELECT NOT rolcanlogin FROM pg_roles WHERE rolname = 'herder_verifier'"
    )
    held = (
        "INSERT INTO herder.jobs (kind, payload, status) "
        "VALUES ('synthetic', $1, 'UNVERIFIED') RETURNING id"
    )
    mine = await alice.fetchval(held, {"tasks": 1})
    assert await alice.fetchval("SELECT herder.verify_job($1)", mine) is False
    assert await bob.fetchval("SELECT herder.verify_job($1)", mine) is False
    assert (await job_state(conn, mine))["status"] == "UNVERIFIED"
    assert await victor.fetchval("SELECT herder.verify_job($1)", mine) is True
    assert (await job_state(conn, mine))["status"] == "PREPARING"
    assert await victor.fetchval("SELECT herder.verify_job($1)", mine) is False  # done already
    async with running_daemon(db_url, **FAST):
        assert (await wait_settled(conn, mine))["status"] == "SUCCESS"


# ---------------------------------------------------------------- case 12


TASK_INSERT_LOG = """
CREATE TABLE public.task_inserts (n bigint);
CREATE FUNCTION public.log_task_inserts() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.task_inserts SELECT count(*) FROM inserted;
    RETURN NULL;
END $$;
CREATE TRIGGER log_task_inserts AFTER INSERT ON herder.tasks
    REFERENCING NEW TABLE AS inserted FOR EACH STATEMENT
    EXECUTE FUNCTION public.log_task_inserts();
ALTER TABLE herder.tasks ENABLE ALWAYS TRIGGER log_task_inserts;
"""


async def test_case12_a_job_asking_for_too_many_tasks_fails_before_any_is_written(
    db_url: str, conn: db.Connection
) -> None:
    """Case 12: a job asking for 1e9 tasks wrote 10,000,000 rows (about 30 s of the whole
    database) before the limit failed it, and retry_job repeated it; hostile jobs like
    it kept good ones waiting. Now the built-in kind fails it before writing anything."""
    await conn.execute(TASK_INSERT_LOG)
    async with running_daemon(db_url, **FAST):
        hostile = [await submit(conn, "synthetic", {"tasks": 10**9}) for _ in range(10)]
        good = await submit(conn, "synthetic", {"tasks": 5})
        started = time.monotonic()
        for job_id in hostile:
            job = await wait_settled(conn, job_id, timeout=5)
            assert job["status"] == "FAILURE"
            assert "max_tasks_per_job" in job["message"], job["message"]
        assert (await wait_settled(conn, good, timeout=5))["status"] == "SUCCESS"
        assert time.monotonic() - started < 5
        first = await job_state(conn, hostile[0])
        assert await conn.fetchval("SELECT herder.retry_job($1)", hostile[0]) is True
        again = await wait_settled(conn, hostile[0], timeout=5, after=first["ended_at"])
        assert again["status"] == "FAILURE"
        assert "max_tasks_per_job" in again["message"]
        await assert_still_serving(conn)
    # Of all the task rows ever committed, only the good jobs' 5 + 3 tasks.
    assert await conn.fetchval("SELECT coalesce(sum(n), 0) FROM public.task_inserts") == 8
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM herder.tasks WHERE job_id = ANY($1::bigint[])", hostile
        )
        == 0
    )


async def test_case12_prepare_knows_the_limit_and_is_stopped_past_it(
    db_url: str, conn: db.Connection, make_kind: Callable[..., Kind]
) -> None:
    """Case 12 (3.13): JobContext tells prepare the task limit; a prepare yielding more
    than the limit is stopped at the first batch past it, and none of its tasks is left."""
    await conn.execute("UPDATE herder.settings SET value = 50 WHERE name = 'max_tasks_per_job'")
    kind = make_kind("endless")
    limits: list[int] = []

    @kind.prepare
    async def prepare(job: herder.JobContext) -> AsyncIterator[herder.JSON]:
        limits.append(job.max_tasks)
        for i in itertools.count():
            if i % 1000 == 0:
                await anyio.lowlevel.checkpoint()
            yield {"i": i}

    @kind.process
    async def process(task: herder.TaskContext) -> herder.JSON:
        return None

    async with running_daemon(db_url, **FAST):
        job_id = await submit(conn, "endless", {})
        job = await wait_settled(conn, job_id, timeout=5)
        await assert_still_serving(conn)
    assert limits == [50]
    assert job["status"] == "FAILURE"
    assert "max_tasks_per_job" in job["message"], job["message"]
    assert await conn.fetchval("SELECT count(*) FROM herder.tasks WHERE job_id = $1", job_id) == 0


# ---------------------------------------------------------------- case 13


async def test_case13_cancel_of_a_big_running_job_returns_at_once_and_stalls_nobody(
    db_url: str, conn: db.Connection
) -> None:
    """Case 13: cancel_job on a big running job canceled every pending task in one
    transaction: it took seconds, and waited on (and held) rows the daemons needed.
    Now it returns at once, touching no task row itself and waiting on none a daemon
    holds (here one pending task is locked, as a claim in flight would); the daemon then
    cancels the tasks, and a one-task job submitted meanwhile finishes promptly."""
    async with running_daemon(db_url, concurrency=4, **FAST):
        big = await submit(conn, "synthetic", {"tasks": 5000, "task_ms": 1000})
        await wait_status(conn, big, "IN_PROGRESS")
        locker = await db.connect(db_url)
        canceler = await db.connect(db_url)
        try:
            async with locker.transaction():
                await locker.execute(
                    "SELECT 1 FROM herder.tasks WHERE id = (SELECT max(id) FROM herder.tasks "
                    "WHERE job_id = $1 AND status = 'PENDING') FOR UPDATE",
                    big,
                )
                with anyio.fail_after(2):
                    touched = await task_rows_touched_by(
                        canceler, "SELECT herder.cancel_job($1)", big
                    )
                assert touched == 0
        finally:
            await locker.close()
            await canceler.close()
        small = await submit(conn, "synthetic", {"tasks": 1})
        assert (await wait_settled(conn, small, timeout=3))["status"] == "SUCCESS"
        job = await wait_settled(conn, big, timeout=10)
        await assert_still_serving(conn)
    assert job["status"] == "CANCELED"
    rows = await conn.fetch(
        "SELECT status, count(*) AS n FROM herder.tasks WHERE job_id = $1 GROUP BY status", big
    )
    counts: dict[str, int] = {r["status"]: r["n"] for r in rows}
    assert set(counts) <= {"CANCELED", "SUCCESS"}, counts
    assert counts["CANCELED"] >= 4990


JOB_IN_STATE = """
WITH job AS (
    INSERT INTO herder.jobs (kind, payload, status, prepared, prepared_at, started_at, ended_at)
    VALUES ('synthetic', jsonb_build_object('tasks', $1::int), $2, $1, clock_timestamp(),
            clock_timestamp(), CASE WHEN $2 IN ('CANCELED', 'FAILURE') THEN clock_timestamp() END)
    RETURNING id
), tasks AS (
    INSERT INTO herder.tasks (job_id, seq, payload, status, attempts, message, ended_at)
    SELECT job.id, i, jsonb_build_object('i', i), $3,
           CASE WHEN $3 = 'FAILURE' THEN 1 ELSE 0 END,
           CASE WHEN $3 = 'PENDING' THEN NULL ELSE 'before' END,
           CASE WHEN $3 = 'PENDING' THEN NULL ELSE clock_timestamp() END
    FROM job, generate_series(0, $1 - 1) i
)
SELECT id FROM job
"""


@pytest.mark.parametrize(
    ("action", "job_status", "task_status", "settles"),
    [
        ("cancel", "IN_PROGRESS", "PENDING", "CANCELED"),
        ("resume", "CANCELED", "CANCELED", "SUCCESS"),
        ("retry", "FAILURE", "FAILURE", "SUCCESS"),
        ("restart", "FAILURE", "FAILURE", "SUCCESS"),
    ],
)
async def test_extra_controls_of_a_big_job_touch_no_task_row_themselves(
    db_url: str,
    conn: db.Connection,
    action: str,
    job_status: str,
    task_status: str,
    settles: str,
) -> None:
    """Case 13 ("controls cost milliseconds"): cancel, resume, retry and restart of a
    job of any size only mark the job; daemons do the per-task work in batches."""
    tasks = 3000
    job_id: int = await conn.fetchval(JOB_IN_STATE, tasks, job_status, task_status)
    controller = await db.connect(db_url)
    try:
        touched = await task_rows_touched_by(controller, f"SELECT herder.{action}_job($1)", job_id)
    finally:
        await controller.close()
    assert touched == 0
    async with running_daemon(db_url, **FAST):
        job = await wait_settled(conn, job_id, timeout=10)
        await assert_still_serving(conn)
    assert job["status"] == settles
    rows = await conn.fetch(
        "SELECT status, count(*) AS n FROM herder.tasks WHERE job_id = $1 GROUP BY status",
        job_id,
    )
    assert {r["status"]: r["n"] for r in rows} == {settles: tasks}


# ---------------------------------------------------------------- extras: handlers' output


async def test_extra_outcomes_postgres_cannot_store_fail_their_task_with_a_message(
    db_url: str, conn: db.Connection, make_kind: Callable[..., Kind]
) -> None:
    """3.9: results with NUL or lone surrogates, non-JSON and huge results, long messages
    and warnings with NUL each end their own task with a message PostgreSQL can store;
    the other tasks of the same job and the daemon are untouched."""
    kind = make_kind("bad_outcomes", max_attempts=1)
    one_task_per_item(kind)

    @kind.process
    async def process(task: herder.TaskContext) -> herder.JSON:
        what = task.payload["do"]
        results: dict[str, Any] = {
            "nul_result": {"s": "a\x00b"},
            "surrogate_result": {"s": "a\ud800b"},
            "nan": float("nan"),
            "inf": {"x": math.inf},
            "set": {1, 2},
            "object": object(),
            "huge": {"blob": "x" * (2 * 1024 * 1024)},
            "deep": _nested(3000),
        }
        if what == "long_message":
            raise ValueError("x" * 5_000_000)
        if what == "nul_warning":
            return herder.warn("bad\x00warn", {"n": 1})
        if what == "fine":
            return {"ok": True}
        return results[what]

    items = [
        "nul_result",
        "surrogate_result",
        "nan",
        "inf",
        "set",
        "object",
        "huge",
        "deep",
        "long_message",
        "nul_warning",
        "fine",
    ]
    async with running_daemon(db_url, **FAST):
        job_id = await submit(conn, "bad_outcomes", {"items": [{"do": d} for d in items]})
        job = await wait_settled(conn, job_id)
        await assert_still_serving(conn)
    assert job["status"] == "FAILURE"
    by_do = {t["payload"]["do"]: t for t in await tasks_of(conn, job_id)}
    cannot_store = "process returned a result PostgreSQL cannot store"
    not_json = "process returned a result that is not JSON"
    expected = {
        "nul_result": ("FAILURE", cannot_store),
        "surrogate_result": ("FAILURE", cannot_store),
        "nan": ("FAILURE", not_json),
        "inf": ("FAILURE", not_json),
        "set": ("FAILURE", not_json),
        "object": ("FAILURE", not_json),
        "huge": ("FAILURE", ""),
        "deep": ("FAILURE", "process returned a result"),
        "long_message": ("FAILURE", "xxxx"),
        "nul_warning": ("WARNING", "bad\ufffdwarn"),
        "fine": ("SUCCESS", None),
    }
    wrong = [
        (do, t["status"], (t["message"] or "")[:200])
        for do, t in by_do.items()
        if t["status"] != expected[do][0]
        or (expected[do][1] is None and t["message"] is not None)
        or not (t["message"] or "").startswith(expected[do][1] or "")
    ]
    assert wrong == []
    assert "max_result_bytes" in by_do["huge"]["message"]
    long_message = by_do["long_message"]["message"]
    assert "[truncated" in long_message and len(long_message) < 5_000_000
    assert by_do["nul_warning"]["result"] == {"n": 1}
    assert by_do["fine"]["result"] == {"ok": True}
    for t in by_do.values():
        assert t["attempts"] == 1


def _nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


async def test_extra_a_prepare_failure_message_with_nul_fails_the_job_storably(
    db_url: str, conn: db.Connection, make_kind: Callable[..., Kind]
) -> None:
    """3.9: the job's failure message goes through the same cleaning as a task's."""
    kind = make_kind("bad_prepare")

    @kind.prepare
    async def prepare(job: herder.JobContext) -> AsyncIterator[herder.JSON]:
        raise ValueError("bad\x00prepare")
        yield {}  # pragma: no cover  (an async generator)

    @kind.process
    async def process(task: herder.TaskContext) -> herder.JSON:
        return None

    async with running_daemon(db_url, **FAST):
        job = await wait_settled(conn, await submit(conn, "bad_prepare", {}))
        await assert_still_serving(conn)
    assert job["status"] == "FAILURE"
    assert "bad\ufffdprepare" in job["message"], job["message"]


async def test_extra_a_completion_batch_the_database_refuses_is_written_one_by_one(
    db_url: str, conn: db.Connection, make_kind: Callable[..., Kind]
) -> None:
    """Design: when PostgreSQL refuses a whole batch of outcomes anyway (here a check an
    operator added), the outcomes are written one by one and each refused one becomes
    FAILURE "the database refused the task's outcome: ..."; the rest are kept."""
    await conn.execute(
        "ALTER TABLE herder.tasks ADD CONSTRAINT operator_says_no "
        "CHECK (message IS DISTINCT FROM 'refuse me')"
    )
    kind = make_kind("refused", max_attempts=1)
    one_task_per_item(kind)
    release = anyio.Event()

    @kind.process
    async def process(task: herder.TaskContext) -> herder.JSON:
        await release.wait()  # all finish together: one batch
        if task.payload["refuse"]:
            raise ValueError("refuse me")
        return {"seq": task.seq}

    async with running_daemon(db_url, **FAST):
        job_id = await submit(conn, "refused", {"items": [{"refuse": i == 2} for i in range(5)]})

        async def all_running() -> bool:
            n = await conn.fetchval(
                "SELECT count(*) FROM herder.tasks WHERE job_id = $1 AND status = 'IN_PROGRESS'",
                job_id,
            )
            return bool(n == 5)

        await wait_for(all_running, what="the tasks to run")
        release.set()
        job = await wait_settled(conn, job_id)
        await assert_still_serving(conn)
    assert job["status"] == "FAILURE"
    for t in await tasks_of(conn, job_id):
        if t["seq"] == 2:
            assert t["status"] == "FAILURE"
            assert t["message"].startswith("the database refused the task's outcome:")
        else:
            assert (t["status"], t["result"]) == ("SUCCESS", {"seq": t["seq"]})


@pytest.mark.parametrize(
    "delay", [-5.0, math.nan, math.inf, 1e308], ids=["negative", "nan", "inf", "1e308"]
)
async def test_extra_a_retry_delay_out_of_range_is_clamped(
    db_url: str, conn: db.Connection, make_kind: Callable[..., Kind], delay: float
) -> None:
    """Design: herder.Retry(delay=...) negative, NaN, infinite or absurd is clamped into
    [0, the kind's max_backoff]: the task runs again soon and the daemon lives."""
    kind = make_kind("retry_later", max_attempts=2, backoff=0.05, max_backoff=0.3)
    one_task_per_item(kind)

    @kind.process
    async def process(task: herder.TaskContext) -> herder.JSON:
        if task.attempt == 1:
            raise herder.Retry("later", delay=delay)
        return None

    async with running_daemon(db_url, **FAST):
        job = await wait_settled(conn, await submit(conn, "retry_later", {"items": [{}]}))
        await assert_still_serving(conn)
    assert job["status"] == "SUCCESS"
    [task] = await tasks_of(conn, job["id"])
    assert (task["status"], task["attempts"]) == ("SUCCESS", 2)


# ---------------------------------------------------------------- extras: handlers that exit


HOSTILE_APP = """
import herder

hostile = herder.Kind("hostile", max_attempts=2)

def _exception(name):
    return {
        "SystemExit": SystemExit(3),
        "KeyboardInterrupt": KeyboardInterrupt(),
        "GeneratorExit": GeneratorExit(),
    }[name]

@hostile.prepare
async def prepare(job):
    if job.payload["where"] == "prepare":
        raise _exception(job.payload["raise"])
    yield job.payload

@hostile.process
async def process(task):
    if task.payload["where"] == "process":
        raise _exception(task.payload["raise"])
    return None

@hostile.on_finished
async def finished(job):
    if job.payload["where"] == "on_finished":
        await job.pool.execute("INSERT INTO public.hook_runs VALUES ($1)", job.id)
        raise _exception(job.payload["raise"])
"""

BASE_EXCEPTIONS = ("SystemExit", "KeyboardInterrupt", "GeneratorExit")


async def test_extra_process_raising_systemexit_keyboardinterrupt_or_generatorexit_fails_its_task(
    db_url: str,
    conn: db.Connection,
    daemons: Daemons,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Design: a handler raising SystemExit, KeyboardInterrupt or GeneratorExit fails its
    task (not retried), with a message naming the exception; the daemon (a real
    ``herder run`` process) lives on."""
    app = write_app(tmp_path, monkeypatch, HOSTILE_APP)
    daemon = daemons(db_url, *FAST_CLI, "--app", app)
    await daemon.ready()
    jobs = {
        name: await submit(conn, "hostile", {"where": "process", "raise": name})
        for name in BASE_EXCEPTIONS
    }
    for name, job_id in jobs.items():
        job = await wait_settled_in(daemon, conn, job_id)
        assert job["status"] == "FAILURE", (name, job, daemon.log[-3000:])
        [task] = await tasks_of(conn, job_id)
        assert task["status"] == "FAILURE"
        assert task["attempts"] == 1, name
        assert name in task["message"], task["message"]
    assert await alive(daemon), daemon.log[-3000:]
    await assert_still_serving(conn)
    assert await alive(daemon)
    daemon.signal(signal.SIGTERM)
    assert await daemon.exited() == 0


async def test_extra_prepare_or_on_finished_raising_systemexit_and_the_like_stop_no_daemon(
    db_url: str,
    conn: db.Connection,
    daemons: Daemons,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """3.9: the same from ``prepare`` (the job fails, naming the exception) and from
    ``on_finished`` (the hook fails once, the daemon serves on)."""
    await conn.execute("CREATE TABLE public.hook_runs (job_id bigint)")
    app = write_app(tmp_path, monkeypatch, HOSTILE_APP)
    daemon = daemons(db_url, *FAST_CLI, "--app", app)
    await daemon.ready()
    in_prepare = {
        name: await submit(conn, "hostile", {"where": "prepare", "raise": name})
        for name in BASE_EXCEPTIONS
    }
    in_hook = {
        name: await submit(conn, "hostile", {"where": "on_finished", "raise": name})
        for name in BASE_EXCEPTIONS
    }
    for name, job_id in in_prepare.items():
        job = await wait_settled_in(daemon, conn, job_id)
        assert job["status"] == "FAILURE", (name, job, daemon.log[-3000:])
        assert name in job["message"], job["message"]
    for job_id in in_hook.values():
        assert (await wait_settled_in(daemon, conn, job_id))["status"] == "SUCCESS"

    async def hooks_ran() -> bool:
        assert await alive(daemon), daemon.log[-4000:]
        n = await conn.fetchval("SELECT count(DISTINCT job_id) FROM public.hook_runs")
        return bool(n == len(in_hook))

    await wait_for(hooks_ran, what="the hostile hooks to run", timeout=10)
    assert await alive(daemon), daemon.log[-3000:]
    await assert_still_serving(conn)
    # A crashing hook runs once, crashes included (3.3): not again and again.
    assert await conn.fetchval("SELECT count(*) FROM public.hook_runs") == len(in_hook)
    assert await alive(daemon)
    daemon.signal(signal.SIGTERM)
    assert await daemon.exited() == 0


# ---------------------------------------------------------------- extras: start-up checks


NO_PROCESS_APP = """
import herder

half = herder.Kind("{name}")

@half.prepare
async def prepare(job):
    yield {{}}
"""


async def test_extra_a_kind_without_process_is_a_one_line_startup_error(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """3.9 and design: kinds are checked when the app loads. ``herder run --app`` with a
    kind lacking ``process`` exits non-zero at start with one line naming the kind, no
    traceback; ``Daemon(DaemonConfig(apps=[...]))`` raises KindError."""
    name = f"half_kind_{next(_names)}"
    app = write_app(tmp_path, monkeypatch, NO_PROCESS_APP.format(name=name))
    try:
        with pytest.raises(KindError, match=name):
            Daemon(DaemonConfig(database_url=db_url, apps=[app], health_addr="127.0.0.1:0"))
    finally:
        unregister(name)
        sys.modules.pop(app, None)

    out, err = tmp_path / "out.log", tmp_path / "err.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERDER_")}
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = await anyio.open_process(
            [sys.executable, "-m", "herder", "run", "--app", app, *FAST_CLI],
            env={**env, "DATABASE_URL": db_url},
            stdout=stdout,
            stderr=stderr,
        )
    try:

        async def exited_or_serving() -> bool:
            return proc.returncode is not None or '"serving"' in out.read_text(errors="replace")

        await wait_for(exited_or_serving, timeout=30, what="the daemon to start or refuse")
        assert proc.returncode is not None, "the daemon started serving a kind without process"
    finally:
        if proc.returncode is None:
            proc.kill()
        with anyio.fail_after(10):
            await proc.wait()
    assert proc.returncode != 0
    lines = err.read_text().strip().splitlines()
    assert len(lines) == 1, err.read_text()
    assert lines[0].startswith("error: ") and name in lines[0] and "process" in lines[0]
    assert "Traceback" not in out.read_text() + err.read_text()
