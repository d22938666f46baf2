"""The sharing phase: many users on one service. Each measure starts on a fresh database
with its own daemons (herder run processes, concurrency as configured):

- a 10-task job submitted behind a 20,000-task job of 10 ms tasks: seconds to done;
- the same behind three long preparations;
- after 5,000 no-op tasks, a job of 100 ms tasks: the most tasks of it the daemon held at
  once (from half a second after they started: what a claim took while the kind looked
  instant is handed back by then), and a priority-5 job of ten 100 ms tasks submitted
  behind it: seconds to done;
- 20 plain `time.sleep(0.5)` tasks (a plain Python handler): seconds to done;
- two daemons with different --app modules and jobs of both kinds: how many jobs failed;
- what fairness costs: one job of no-op tasks with fair sharing on, then off
  (`--no-fair-sharing`), back to back.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
from rich.progress import Progress

from bench.dbs import Server
from bench.herder_runs import PhaseTimeout, daemons
from bench.model import Sharing
from bench.options import Options
from herder import db
from herder.states import JOB_FINISHED

POLL = 0.02


async def sharing(server: Server, opts: Options, progress: Progress) -> Sharing:
    bar = progress.add_task("herder: sharing (fairness, hoarding, plain, routing)", total=5)
    result = Sharing(
        small_behind_big_s=await _small_behind_big(server, opts),
        small_behind_preparations_s=await _small_behind_preparations(server, opts),
    )
    progress.update(bar, completed=2)
    result.held_most, result.urgent_s = await _hoarding(server, opts)
    progress.update(bar, completed=3)
    result.plain_sleep_s = await _plain_sleep(server, opts)
    progress.update(bar, completed=4)
    result.mixed_fleet_jobs, result.mixed_fleet_failed = await _mixed_fleet(server, opts)
    result.fair_rate = await _noop_rate(server, opts, fair=True)
    result.unfair_rate = await _noop_rate(server, opts, fair=False)
    progress.update(bar, completed=5)
    return result


async def _insert(conn: db.Connection, kind: str, payload: dict[str, Any], **job: Any) -> int:
    job_id: int = await conn.fetchval(
        "INSERT INTO herder.jobs (kind, payload, owner, priority) VALUES ($1, $2, $3, $4) "
        "RETURNING id",
        kind,
        payload,
        job.get("owner", "alice"),
        job.get("priority", 0),
    )
    return job_id


async def _until(conn: db.Connection, query: str, *args: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not await conn.fetchval(query, *args):
        if time.monotonic() > deadline:
            raise PhaseTimeout(f"sharing: not after {timeout}s: {query}")
        await anyio.sleep(POLL)


async def _seconds_to_done(conn: db.Connection, job_id: int, timeout: float = 60) -> float:
    await _until(
        conn,
        "SELECT status = ANY($2::text[]) FROM herder.jobs WHERE id = $1",
        job_id,
        list(JOB_FINISHED),
        timeout=timeout,
    )
    seconds: float = await conn.fetchval(
        "SELECT extract(epoch FROM ended_at - created_at)::float8 FROM herder.jobs WHERE id = $1",
        job_id,
    )
    return seconds


async def _fresh(server: Server, name: str) -> tuple[str, db.Connection]:
    url = await server.fresh_herder(name)
    return url, await db.connect(url)


async def _small_behind_big(server: Server, opts: Options) -> float:
    url, conn = await _fresh(server, "herder_bench_fair")
    try:
        async with daemons("fair", url, opts):
            big = await _insert(conn, "synthetic", {"tasks": 20_000, "task_ms": 10})
            await _until(
                conn,
                "SELECT count(*) >= 50 FROM herder.tasks WHERE job_id = $1 AND status = 'SUCCESS'",
                big,
            )
            small = await _insert(conn, "synthetic", {"tasks": 10, "task_ms": 10}, owner="bob")
            seconds = await _seconds_to_done(conn, small)
            await conn.execute("SELECT herder.cancel_job($1)", big)
            return seconds
    finally:
        await conn.close()


async def _small_behind_preparations(server: Server, opts: Options) -> float:
    url, conn = await _fresh(server, "herder_bench_fair_prep")
    try:
        async with daemons("fair-prep", url, opts):
            longs = [
                await _insert(conn, "synthetic", {"tasks": 100_000, "prepare_ms": 1})
                for _ in range(3)
            ]
            await _until(
                conn,
                "SELECT count(*) = 3 FROM herder.jobs WHERE id = ANY($1::bigint[]) "
                "AND preparer IS NOT NULL",
                longs,
            )
            small = await _insert(conn, "synthetic", {"tasks": 10, "task_ms": 10}, owner="bob")
            seconds = await _seconds_to_done(conn, small)
            for job_id in longs:
                await conn.execute("SELECT herder.cancel_job($1)", job_id)
            return seconds
    finally:
        await conn.close()


async def _hoarding(server: Server, opts: Options) -> tuple[int, float]:
    url, conn = await _fresh(server, "herder_bench_hoard")
    try:
        async with daemons("hoard", url, opts):
            warm = await _insert(conn, "synthetic", {"tasks": 5_000})
            await _seconds_to_done(conn, warm)
            slow = await _insert(conn, "synthetic", {"tasks": 2_000, "task_ms": 100})
            held_query = (
                "SELECT count(*) FROM herder.tasks WHERE job_id = $1 AND status = 'IN_PROGRESS'"
            )
            await _until(conn, f"SELECT ({held_query}) >= 10", slow)
            # A claim made while the kind still looked instant is handed back once its
            # first slow tasks are measured (within about a quarter of a second): the
            # measure is what the daemon holds from then on.
            await anyio.sleep(0.5)
            most = 0
            with anyio.move_on_after(1.0):
                while True:
                    most = max(most, await conn.fetchval(held_query, slow))
                    await anyio.sleep(POLL)
            urgent = await _insert(
                conn, "synthetic", {"tasks": 10, "task_ms": 100}, owner="bob", priority=5
            )
            seconds = await _seconds_to_done(conn, urgent)
            await conn.execute("SELECT herder.cancel_job($1)", slow)
            return most, seconds
    finally:
        await conn.close()


async def _plain_sleep(server: Server, opts: Options) -> float:
    url, conn = await _fresh(server, "herder_bench_plain")
    try:
        async with daemons("plain", url, opts, apps=("bench.apps",)):
            job_id = await _insert(conn, "bench-sleep", {"seconds": 0.5})
            await _seconds_to_done(conn, job_id)  # the kind's first task, measured apart
            items: list[dict[str, Any]] = [{"seconds": 0.5}] * 20
            ids = [await _insert(conn, "bench-sleep", item) for item in items]
            started = time.monotonic()
            for job_id in ids:
                await _seconds_to_done(conn, job_id)
            return time.monotonic() - started
    finally:
        await conn.close()


async def _noop_rate(server: Server, opts: Options, *, fair: bool) -> float:
    """Tasks per second of one job of ``opts.tasks`` no-op tasks, first start to last end."""
    url, conn = await _fresh(server, "herder_bench_fairness_cost")
    try:
        extra = () if fair else ("--no-fair-sharing",)
        async with daemons("fairness-cost", url, opts, extra=extra):
            job_id = await _insert(conn, "synthetic", {"tasks": opts.tasks})
            await _seconds_to_done(conn, job_id, timeout=opts.timeout)
            rate: float = await conn.fetchval(
                "SELECT j.prepared / extract(epoch FROM j.ended_at - j.started_at)::float8 "
                "FROM herder.jobs j WHERE j.id = $1",
                job_id,
            )
            return rate
    finally:
        await conn.close()


async def _mixed_fleet(server: Server, opts: Options) -> tuple[int, int]:
    url, conn = await _fresh(server, "herder_bench_fleet")
    try:
        async with (
            daemons("search", url, opts, apps=("bench.apps_search",)),
            daemons("llm", url, opts, apps=("bench.apps_llm",)),
        ):
            ids = [
                await _insert(conn, "bench-search" if i % 2 else "bench-llm", {}) for i in range(40)
            ]
            for job_id in ids:
                await _seconds_to_done(conn, job_id)
            failed: int = await conn.fetchval(
                "SELECT count(*) FROM herder.jobs WHERE id = ANY($1::bigint[]) "
                "AND status <> 'SUCCESS'",
                ids,
            )
            return len(ids), failed
    finally:
        await conn.close()
