"""Plain Python handlers: a kind's prepare, process and on_finished written without
async run in worker threads, or worker processes (executor="process"), and never block
the event loop."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import anyio
import pytest

import herder
from herder import db
from herder.kinds import Kind
from tests.support import running_daemon, submit, tasks_of, wait_finished, wait_for


async def test_plain_sleeping_tasks_overlap_and_health_answers_meanwhile(
    db_url: str, conn: db.Connection, make_kind: Callable[..., Kind]
) -> None:
    kind = make_kind("sleepy")
    threads: set[int] = set()

    @kind.prepare
    def prepare(job: herder.JobContext) -> Iterator[herder.JSON]:
        for i in range(job.payload["tasks"]):
            yield {"i": i}

    @kind.process
    def process(task: herder.TaskContext) -> herder.JSON:
        threads.add(threading.get_ident())
        time.sleep(0.5)  # blocks its thread, never the event loop
        return {"i": task.payload["i"]}

    async with running_daemon(db_url, concurrency=10) as daemon:
        health = f"http://127.0.0.1:{daemon.health_port}/healthz"
        slowest = 0.0
        async with aiohttp.ClientSession() as http:
            job_id = await submit(conn, "sleepy", {"tasks": 20})

            async def done() -> bool:
                nonlocal slowest
                started = time.perf_counter()
                async with http.get(health) as response:
                    await response.read()
                slowest = max(slowest, time.perf_counter() - started)
                row = await conn.fetchrow("SELECT status FROM herder.jobs WHERE id = $1", job_id)
                return row is not None and row["status"] == "SUCCESS"

            await wait_for(done, timeout=20, interval=0.05, what="the job")
        job = await wait_finished(conn, job_id)
    elapsed = (job["ended_at"] - job["created_at"]).total_seconds()
    assert elapsed <= 1.5, elapsed  # 20 x 0.5 s on 10 threads: two rounds, not twenty
    assert len(threads) >= 10
    assert slowest < 0.1, slowest
    assert [t["result"] for t in await tasks_of(conn, job_id)] == [{"i": i} for i in range(20)]


async def test_plain_prepare_returning_a_list_and_plain_on_finished(
    db_url: str, conn: db.Connection, make_kind: Callable[..., Kind]
) -> None:
    kind = make_kind("listy")
    finished: list[tuple[int, str]] = []

    @kind.prepare
    def prepare(job: herder.JobContext) -> list[herder.JSON]:
        return [{"n": n} for n in job.payload["numbers"]]

    @kind.process
    def process(task: herder.TaskContext) -> herder.JSON:
        return task.payload["n"] * 2

    @kind.on_finished
    def on_finished(job: herder.FinishedJob) -> None:
        time.sleep(0.05)
        finished.append((job.id, job.status))

    async with running_daemon(db_url):
        job_id = await submit(conn, "listy", {"numbers": [1, 2, 3]})
        await wait_finished(conn, job_id)

        async def hooked() -> bool:
            return bool(finished)

        await wait_for(hooked, what="on_finished")
    assert finished == [(job_id, "SUCCESS")]
    assert [t["result"] for t in await tasks_of(conn, job_id)] == [2, 4, 6]


async def test_a_plain_generator_that_raises_fails_its_job_with_the_message(
    db_url: str, conn: db.Connection, make_kind: Callable[..., Kind]
) -> None:
    kind = make_kind("broken-plain")

    @kind.prepare
    def prepare(job: herder.JobContext) -> Iterator[herder.JSON]:
        yield {"i": 0}
        raise ValueError("report 7 is missing")

    async with running_daemon(db_url):
        job = await wait_finished(conn, await submit(conn, "broken-plain", {}))
    assert job["status"] == "FAILURE"
    assert job["message"] == "prepare failed: ValueError: report 7 is missing"


async def test_a_plain_handler_past_its_timeout_is_abandoned_and_its_task_retried(
    db_url: str, conn: db.Connection, make_kind: Callable[..., Kind]
) -> None:
    kind = make_kind("stuck", timeout=0.2, max_attempts=2, backoff=0.01)
    release = threading.Event()

    @kind.process
    def process(task: herder.TaskContext) -> herder.JSON:
        if task.attempt == 1:
            release.wait(10)  # past the timeout: the daemon does not wait for it
        return "second time lucky"

    try:
        async with running_daemon(db_url):
            job = await wait_finished(conn, await submit(conn, "stuck", {}))
    finally:
        release.set()
    assert job["status"] == "SUCCESS"
    [task] = await tasks_of(conn, job["id"])
    assert (task["attempts"], task["result"]) == (2, "second time lucky")


def test_a_plain_generator_is_read_a_chunk_per_thread_trip() -> None:
    """A plain prepare of many tasks costs a few trips to its thread, not one per task."""
    trips = 0
    real = herder.kinds.plain._next_chunk

    def counting(iterator: Iterator[herder.JSON]) -> tuple[list[herder.JSON], bool]:
        nonlocal trips
        trips += 1
        return real(iterator)

    def many(_job: object) -> Iterator[int]:
        yield from range(5000)

    async def read() -> list[int]:
        return [item async for item in herder.kinds.plain.as_async_iterator(many)(None)]

    herder.kinds.plain._next_chunk = counting
    try:
        assert anyio.run(read) == list(range(5000))
    finally:
        herder.kinds.plain._next_chunk = real
    assert trips <= 6


PROCESS_KINDS = ["tests.process_kinds"]


async def test_a_cpu_bound_task_in_a_process_keeps_its_lease(
    db_url: str, conn: db.Connection
) -> None:
    """Two seconds of pure-Python work against a one-second lease: run in a thread it
    would hold the interpreter lock and starve the renewals; in a process it does not."""
    async with running_daemon(db_url, apps=PROCESS_KINDS, lease_seconds=1.0) as daemon:
        job_id = await submit(conn, "test-cpu-bound", {"seconds": 2})
        slowest = 0.0
        async with aiohttp.ClientSession() as http:

            async def done() -> bool:
                nonlocal slowest
                started = time.perf_counter()
                async with http.get(f"http://127.0.0.1:{daemon.health_port}/healthz") as r:
                    await r.read()
                slowest = max(slowest, time.perf_counter() - started)
                row = await conn.fetchrow("SELECT status FROM herder.jobs WHERE id = $1", job_id)
                return row is not None and row["status"] == "SUCCESS"

            await wait_for(done, timeout=30, interval=0.1, what="the job")
    [task] = await tasks_of(conn, job_id)
    assert (task["status"], task["attempts"]) == ("SUCCESS", 1)  # never rescued
    assert task["result"]["pid"] != os.getpid()
    assert slowest < 0.1, slowest


async def test_a_hung_handler_in_a_process_is_killed_at_its_timeout(
    db_url: str, conn: db.Connection, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    async with running_daemon(db_url, apps=PROCESS_KINDS):
        job = await wait_finished(
            conn, await submit(conn, "test-hangs-in-process", {"pid_file": str(pid_file)})
        )
    assert job["status"] == "FAILURE"
    [task] = await tasks_of(conn, job["id"])
    assert task["message"] == "gave up after 1 attempts: timed out after 0.5s"
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped: nothing left spinning


async def test_a_process_that_dies_fails_only_its_task_which_runs_again(
    db_url: str, conn: db.Connection
) -> None:
    async with running_daemon(db_url, apps=PROCESS_KINDS, concurrency=2):
        job_id = await conn.fetchval(
            "INSERT INTO herder.jobs (kind, payload) VALUES ('test-crashes-in-process', $1) "
            "RETURNING id",
            {"crash": True},
        )
        other = await submit(conn, "test-crashes-in-process", {})
        job = await wait_finished(conn, job_id)
        second = await wait_finished(conn, other)
    assert (job["status"], second["status"]) == ("SUCCESS", "SUCCESS")
    [task] = await tasks_of(conn, job_id)
    assert task["attempts"] == 2
    assert task["result"]["attempt"] == 2
    assert "no database pool" in task["result"]["pool"]
    [untouched] = await tasks_of(conn, other)
    assert untouched["attempts"] == 1


async def test_a_process_kind_prepares_and_hooks_in_worker_processes_too(
    db_url: str, conn: db.Connection, tmp_path: Path
) -> None:
    hook_file = tmp_path / "hook"
    async with running_daemon(db_url, apps=PROCESS_KINDS):
        job_id = await conn.fetchval(
            "INSERT INTO herder.jobs (kind, payload) VALUES ('test-all-in-process', $1) "
            "RETURNING id",
            {"tasks": 2500, "hook_file": str(hook_file)},
        )
        job = await wait_finished(conn, job_id)

        async def hooked() -> bool:
            return hook_file.exists()

        await wait_for(hooked, what="on_finished")
    assert job["status"] == "SUCCESS"
    tasks = await tasks_of(conn, job_id)
    assert [t["payload"]["i"] for t in tasks] == list(range(2500))
    pids = {t["payload"]["pid"] for t in tasks} | {t["result"]["pid"] for t in tasks}
    status, hook_pid = hook_file.read_text().split()
    assert status == "SUCCESS"
    assert os.getpid() not in pids | {int(hook_pid)}


async def test_an_exception_that_cannot_cross_back_arrives_as_a_stand_in(
    db_url: str, conn: db.Connection
) -> None:
    """An exception that pickles but cannot be unpickled (required __init__ arguments)
    fails its task under its own name and message, not as an unpickling error."""
    async with running_daemon(db_url, apps=PROCESS_KINDS):
        job = await wait_finished(conn, await submit(conn, "test-awkward-exception", {}))
    [task] = await tasks_of(conn, job["id"])
    assert task["status"] == "FAILURE"
    assert task["message"] == "TwoPartError: report 7 and its lesion sizes"
