"""The Procrastinate phases, measured the same way as herder's: its worker in its own
process, times read from its ``procrastinate_events`` table (``at`` is the ``now()`` of
the transaction that deferred, started or finished the job)."""

from __future__ import annotations

import time

import anyio
import asyncpg
from rich.progress import Progress, TaskID

from bench import procs
from bench.dbs import Server
from bench.herder_runs import PhaseTimeout
from bench.model import Latency, Throughput
from bench.options import Options
from bench.procrastinate_app import TASK_NAME, make_app
from bench.sysstat import CpuMeter

DATABASE = "procrastinate_bench"
BATCH = 1_000
ANALYZE = "ANALYZE procrastinate_jobs, procrastinate_events"


async def _unfinished(conn: asyncpg.Connection, first: int, last: int) -> int:
    n: int = await conn.fetchval(
        "SELECT count(*) FROM procrastinate_jobs WHERE id BETWEEN $1 AND $2"
        " AND status IN ('todo', 'doing')",
        first,
        last,
    )
    return n


async def run(
    server: Server, opts: Options, progress: Progress
) -> tuple[Latency | None, Throughput, float]:
    url = await server.fresh(DATABASE)
    app = make_app(url, min_size=1, max_size=4)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        noop = app.tasks[TASK_NAME]
        conn = await asyncpg.connect(url)
        worker = await procs.start_worker(
            "procrastinate-worker",
            "bench.procrastinate_app",
            [url, "--concurrency", str(opts.concurrency)],
        )
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(procs.watch_memory, [worker])

                # -------------------------------------------------- latency
                latency = None
                if opts.latency_samples:
                    total = opts.latency_warmup + opts.latency_samples
                    bar = progress.add_task("procrastinate: commit-to-start latency", total=total)
                    ids: list[int] = []
                    for i in range(total):
                        job_id: int = await noop.defer_async()
                        if i >= opts.latency_warmup:
                            ids.append(job_id)
                        progress.update(bar, completed=i + 1)
                        await anyio.sleep(opts.latency_interval)
                    await _wait(conn, ids[0], ids[-1], None, progress, bar, 60)
                    latency = await _latency(conn, ids, opts)
                # Planner statistics, as any database that has run a while has them: on a
                # never-analyzed procrastinate_jobs its fetch query can pick a quadratic
                # plan (seen: one fetch running 15 s with 10,000 jobs queued) until
                # autovacuum's first ANALYZE, a minute later. herder gets the same.
                await conn.execute(ANALYZE)

                # -------------------------------------------------- throughput
                tasks = opts.procrastinate_tasks
                bar = progress.add_task(f"procrastinate: {tasks:,} no-op jobs", total=tasks)
                meter = CpuMeter(server.postmaster)
                worker.mark_cpu()
                started = time.monotonic()
                ids = []
                for start in range(0, tasks, BATCH):
                    count = min(BATCH, tasks - start)
                    ids += await noop.batch_defer_async(*({} for _ in range(count)))
                await conn.execute(ANALYZE)
                await _wait(conn, min(ids), max(ids), tasks, progress, bar, opts.timeout)
                cpu, elapsed, machine = worker.cpu(), time.monotonic() - started, meter.stop()
                throughput = await _throughput(conn, min(ids), max(ids), tasks, opts)
                throughput.worker_cpu_seconds = cpu
                throughput.worker_cores = cpu / elapsed
                throughput.machine_cpu_busy = machine
                throughput.server_cores = meter.server_cores
                throughput.bench_cores = meter.bench_cores
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await procs.stop_worker(worker)
                await conn.close()
    return latency, throughput, worker.memory.peak_mb


async def _wait(
    conn: asyncpg.Connection,
    first: int,
    last: int,
    total: int | None,
    progress: Progress,
    bar: TaskID,
    timeout: float,
) -> None:
    deadline = time.monotonic() + timeout
    while left := await _unfinished(conn, first, last):
        if total is not None:
            progress.update(bar, completed=total - left)
        if time.monotonic() > deadline:
            raise PhaseTimeout(f"procrastinate: {left} jobs unfinished after {timeout}s")
        await anyio.sleep(0.5)
    if total is not None:
        progress.update(bar, completed=total)


async def _latency(conn: asyncpg.Connection, ids: list[int], opts: Options) -> Latency:
    rows = await conn.fetch(
        """
        SELECT extract(epoch FROM s.at - d.at)::float8 * 1000 AS latency
        FROM procrastinate_events d
        JOIN procrastinate_events s ON s.job_id = d.job_id AND s.type = 'started'
        WHERE d.type = 'deferred' AND d.job_id = ANY($1::bigint[])
        """,
        ids,
    )
    values = [r["latency"] for r in rows]
    problems = [] if len(values) == len(ids) else [f"{len(values)} of {len(ids)} jobs started"]
    return Latency.of("procrastinate", values, opts.latency_interval, problems)


async def _throughput(
    conn: asyncpg.Connection, first: int, last: int, tasks: int, opts: Options
) -> Throughput:
    row = await conn.fetchrow(
        """
        SELECT extract(epoch FROM max(at) FILTER (WHERE type IN ('succeeded', 'failed'))
                                - min(at) FILTER (WHERE type = 'started'))::float8 AS run,
               extract(epoch FROM max(at) FILTER (WHERE type IN ('succeeded', 'failed'))
                                - min(at) FILTER (WHERE type = 'deferred'))::float8 AS wall,
               count(*) FILTER (WHERE type = 'succeeded') AS succeeded,
               count(*) FILTER (WHERE type = 'started') AS started
        FROM procrastinate_events WHERE job_id BETWEEN $1 AND $2
        """,
        first,
        last,
    )
    assert row is not None
    problems = []
    if row["succeeded"] != tasks:
        problems.append(f"{row['succeeded']} of {tasks} jobs succeeded")
    if row["started"] != tasks:
        problems.append(f"{row['started']} starts for {tasks} jobs")
    return Throughput(
        system="procrastinate",
        tasks=tasks,
        concurrency=opts.concurrency,
        workers=1,
        run_seconds=row["run"],
        rate=tasks / row["run"],
        wall_seconds=row["wall"],
        wall_rate=tasks / row["wall"],
        problems=problems,
    )
