"""The herder phases: latency, throughput, a big preparation, the soak, and scale-out.
Each phase gets a fresh database and its own daemon processes."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from rich.progress import Progress, TaskID

from bench import procs
from bench.dbs import Server
from bench.dbsampler import DbSampler
from bench.model import Latency, Prepare, Profile, ScaleOut, Soak, Throughput, percentile
from bench.options import Options
from bench.sysstat import CpuMeter
from herder import db
from herder.states import JOB_FINISHED

POLL = 0.25  # how often the job's row is read to see it settle
# Counting unfinished tasks for the progress bar costs the database real time (a count
# over the partial index, up to tens of ms with 100,000s queued): do it seldom.
COUNT_EVERY = 2.0
ANALYZE = "ANALYZE herder.jobs, herder.tasks"


class PhaseTimeout(RuntimeError):
    pass


@dataclass
class Daemons:
    workers: list[procs.Worker]

    @property
    def peak_rss_mb(self) -> float:
        return max((w.memory.peak_mb for w in self.workers), default=0.0)

    def cpu(self) -> float:
        return sum(w.cpu() for w in self.workers)

    def mark_cpu(self) -> None:
        for worker in self.workers:
            worker.mark_cpu()


@asynccontextmanager
async def daemons(
    name: str,
    url: str,
    opts: Options,
    count: int = 1,
    apps: tuple[str, ...] = (),
    extra: tuple[str, ...] = (),
) -> AsyncIterator[Daemons]:
    """``count`` herder daemons serving ``url`` (and the kinds of ``apps``), each its own
    process, RSS watched."""
    workers: list[procs.Worker] = []
    try:
        for i in range(count):
            args = [
                "run",
                "--database-url",
                url,
                "--concurrency",
                str(opts.concurrency),
                "--health-addr",
                "127.0.0.1:0",  # any free port: several daemons run side by side
                "--name",
                f"bench-{name}-{i}",
                "--log-level",
                opts.log_level,
            ]
            if opts.prefetch:
                args += ["--prefetch", str(opts.prefetch)]
            for app in apps:
                args += ["--app", app]
            args += extra
            suffix = f"-{i}" if count > 1 else ""
            workers.append(await procs.start_worker(f"herder-{name}{suffix}", "herder", args))
        await anyio.sleep(0.3)  # let the listener connect before anything is submitted
        async with anyio.create_task_group() as tg:
            tg.start_soon(procs.watch_memory, workers)
            try:
                yield Daemons(workers)
            finally:
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            for worker in workers:
                code = await procs.stop_worker(worker)
                if code not in (0, None, -signal.SIGTERM):
                    print(f"warning: {worker.name} exited with {code}; see {worker.log_path}")


async def submit(conn: db.Connection, payload: dict[str, Any]) -> int:
    job_id: int = await conn.fetchval(
        "INSERT INTO herder.jobs (kind, payload) VALUES ('synthetic', $1) RETURNING id", payload
    )
    return job_id


async def _remaining(conn: db.Connection, job_id: int | None = None) -> int:
    """Tasks PENDING or IN_PROGRESS (the partial indexes answer this)."""
    where = "" if job_id is None else " AND job_id = $1"
    args = () if job_id is None else (job_id,)
    pending: int = await conn.fetchval(
        f"SELECT count(*) FROM herder.tasks WHERE status = 'PENDING'{where}", *args
    )
    running: int = await conn.fetchval(
        f"SELECT count(*) FROM herder.tasks WHERE status = 'IN_PROGRESS'{where}", *args
    )
    return pending + running


async def wait_settled(
    conn: db.Connection,
    job_id: int,
    total: int,
    progress: Progress,
    bar: TaskID,
    timeout: float,
) -> str:
    """Follow the job on the progress bar until it settles; return its status."""
    deadline = time.monotonic() + timeout
    next_count = time.monotonic() + COUNT_EVERY
    while True:
        row = await conn.fetchrow(
            "SELECT status, prepared, prepared_at FROM herder.jobs WHERE id = $1", job_id
        )
        assert row is not None
        status: str = row["status"]
        if status in JOB_FINISHED:
            progress.update(bar, completed=total)
            return status
        if row["prepared_at"] is not None and time.monotonic() >= next_count:
            progress.update(bar, completed=total - await _remaining(conn, job_id))
            next_count = time.monotonic() + COUNT_EVERY
        if time.monotonic() > deadline:
            raise PhaseTimeout(f"job {job_id} not settled after {timeout}s (status {status})")
        await anyio.sleep(POLL)


async def job_throughput(
    conn: db.Connection, job_ids: list[int], tasks: int, concurrency: int, workers: int
) -> Throughput:
    """Read the rate off the database's timestamps and check every task ran once."""
    t = await conn.fetchrow(
        """
        SELECT count(*) AS tasks,
               count(*) FILTER (WHERE status = 'SUCCESS') AS success,
               count(*) FILTER (WHERE attempts <> 1) AS reattempted,
               extract(epoch FROM max(ended_at) - min(started_at))::float8 AS run_seconds
        FROM herder.tasks WHERE job_id = ANY($1::bigint[])
        """,
        job_ids,
    )
    j = await conn.fetchrow(
        """
        SELECT extract(epoch FROM max(ended_at) - min(created_at))::float8 AS wall,
               extract(epoch FROM max(prepared_at - created_at))::float8 AS prepare,
               array_agg(status) AS statuses
        FROM herder.jobs WHERE id = ANY($1::bigint[])
        """,
        job_ids,
    )
    assert t is not None and j is not None
    problems = []
    if t["tasks"] != tasks:
        problems.append(f"{t['tasks']} tasks exist, expected {tasks}")
    if t["success"] != t["tasks"]:
        problems.append(f"only {t['success']} of {t['tasks']} tasks SUCCESS")
    if t["reattempted"]:
        problems.append(f"{t['reattempted']} tasks ran more than once")
    if any(s != "SUCCESS" for s in j["statuses"]):
        problems.append(f"job statuses {sorted(set(j['statuses']))}")
    run = t["run_seconds"] or float("nan")
    wall = j["wall"] or float("nan")
    return Throughput(
        system="herder",
        tasks=tasks,
        concurrency=concurrency,
        workers=workers,
        run_seconds=run,
        rate=tasks / run,
        wall_seconds=wall,
        wall_rate=tasks / wall,
        prepare_seconds=j["prepare"],
        problems=problems,
    )


async def run_job(
    conn: db.Connection,
    running: Daemons,
    payload: dict[str, Any],
    opts: Options,
    progress: Progress,
    label: str,
    *,
    profile_url: str | None = None,
    phase: str | None = None,
    postmaster: int | None = None,
) -> tuple[Throughput, Profile | None]:
    """Submit one job on idle daemons and measure it. With ``profile_url`` (the job's
    database), py-spy the first daemon and sample the database's active statements."""
    tasks = int(payload["tasks"])
    bar = progress.add_task(label, total=tasks)
    meter = CpuMeter(postmaster)
    async with profiling(running, profile_url or "", phase) as found:
        running.mark_cpu()
        meter.start()
        started = time.monotonic()
        job_id = await submit(conn, payload)
        await wait_settled(conn, job_id, tasks, progress, bar, opts.timeout)
        cpu, elapsed, machine = running.cpu(), time.monotonic() - started, meter.stop()
    result = await job_throughput(conn, [job_id], tasks, opts.concurrency, len(running.workers))
    result.worker_cpu_seconds = cpu
    result.worker_cores = cpu / elapsed
    result.machine_cpu_busy = machine
    result.server_cores = meter.server_cores
    result.bench_cores = meter.bench_cores
    profile = found.profile
    return result, profile


class Profiling:
    """Holds what ``profiling`` found once its block has ended."""

    def __init__(self) -> None:
        self.profile: Profile | None = None


@asynccontextmanager
async def profiling(running: Daemons, url: str, phase: str | None) -> AsyncIterator[Profiling]:
    """With a ``phase`` name: py-spy the first daemon (if py-spy is installed) and sample
    the database's active statements while the block runs. Without: nothing."""
    found = Profiling()
    if phase is None:
        yield found
        return
    output = procs.LOG_DIR / f"profile-herder-{phase}.txt"
    output.unlink(missing_ok=True)
    sampler = DbSampler(url)
    spy = _py_spy()
    process = None
    if spy is not None:
        pid = str(running.workers[0].pid)
        command = [spy, "record", "--pid", pid, "--rate", "200", "--nonblocking"]
        process = await anyio.open_process(
            [*command, "--format", "raw", "-o", str(output)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        await anyio.sleep(0.5)  # py-spy needs a moment to attach
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(sampler.run)
            yield found
            tg.cancel_scope.cancel()
    finally:
        if process is not None:
            with anyio.CancelScope(shield=True):
                process.send_signal(signal.SIGINT)  # py-spy writes its file and exits
                with anyio.move_on_after(20):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                await process.aclose()
    leaf, ours = top_frames(output)
    found.profile = Profile(leaf, ours, sampler.top(), sampler.samples)


def _py_spy() -> str | None:
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else shutil.which("py-spy")


def top_frames(collapsed: Path, limit: int = 12) -> tuple[list[tuple[str, float]], ...]:
    """From a py-spy ``--format raw`` file: leaf frames by share of samples, and the
    innermost frame of herder's own code in each sample (where herder spends it)."""
    leaves: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    total = 0
    try:
        lines = collapsed.read_text().splitlines()
    except OSError:
        return [], []
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        leaves[frames[-1]] += int(count)
        mine = [f for f in frames if "herder/" in f]
        ours[mine[-1] if mine else "(outside herder)"] += int(count)
        total += int(count)
    if not total:
        return [], []
    return (
        [(frame, n / total) for frame, n in leaves.most_common(limit)],
        [(frame, n / total) for frame, n in ours.most_common(limit)],
    )


# ---------------------------------------------------------------- phases


async def latency_and_throughput(
    server: Server, opts: Options, progress: Progress
) -> tuple[Latency | None, Throughput, float, Profile | None]:
    """On one idle daemon: single-task jobs one by one, then one job of ``opts.tasks``."""
    url = await server.fresh_herder("herder_bench")
    conn = await db.connect(url)
    try:
        async with daemons("main", url, opts) as running:
            latency = await measure_latency(conn, opts, progress) if opts.latency_samples else None
            await conn.execute(ANALYZE)  # as procrastinate gets (see procrastinate_runs)
            throughput, profile = await run_job(
                conn,
                running,
                {"tasks": opts.tasks},
                opts,
                progress,
                f"herder: {opts.tasks:,} no-op tasks",
                profile_url=url,
                phase="throughput" if opts.profile else None,
                postmaster=server.postmaster,
            )
            rss = running.peak_rss_mb
    finally:
        await conn.close()
    return latency, throughput, rss, profile


async def measure_latency(conn: db.Connection, opts: Options, progress: Progress) -> Latency:
    total = opts.latency_warmup + opts.latency_samples
    bar = progress.add_task("herder: commit-to-start latency", total=total)
    ids: list[int] = []
    for i in range(total):
        job_id = await submit(conn, {"tasks": 1})
        if i >= opts.latency_warmup:
            ids.append(job_id)
        progress.update(bar, completed=i + 1)
        await anyio.sleep(opts.latency_interval)
    deadline = time.monotonic() + 60
    while await conn.fetchval(
        "SELECT count(*) FROM herder.jobs WHERE id = ANY($1::bigint[]) AND status <> ALL($2)",
        ids,
        list(JOB_FINISHED),
    ):
        if time.monotonic() > deadline:
            raise PhaseTimeout("latency jobs not settled after 60s")
        await anyio.sleep(0.05)
    rows = await conn.fetch(
        """
        SELECT extract(epoch FROM t.started_at - j.created_at)::float8 * 1000 AS latency,
               extract(epoch FROM j.prepared_at - j.created_at)::float8 * 1000 AS prepare,
               t.status, t.attempts
        FROM herder.jobs j JOIN herder.tasks t ON t.job_id = j.id
        WHERE j.id = ANY($1::bigint[])
        """,
        ids,
    )
    values = [r["latency"] for r in rows]
    problems = []
    if len(rows) != len(ids):
        problems.append(f"{len(rows)} tasks for {len(ids)} jobs")
    if bad := [r for r in rows if r["status"] != "SUCCESS" or r["attempts"] != 1]:
        problems.append(f"{len(bad)} tasks not SUCCESS on their first attempt")
    return Latency.of(
        "herder",
        values,
        opts.latency_interval,
        problems,
        prepare_p50_ms=percentile([r["prepare"] for r in rows], 50),
    )


async def prepare_big_job(
    server: Server, opts: Options, progress: Progress
) -> tuple[Prepare, Profile | None]:
    """INSERT a job of ``opts.prepare_tasks`` tasks; time its commit to ``prepared_at``.
    The daemon is stopped as soon as the job is PENDING and the database dropped."""
    tasks = opts.prepare_tasks
    url = await server.fresh_herder("herder_bench_prepare")
    conn = await db.connect(url)
    bar = progress.add_task(f"herder: prepare {tasks:,} tasks", total=tasks)
    problems: list[str] = []
    try:
        async with (
            daemons("prepare", url, opts) as running,
            profiling(running, url, "prepare" if opts.profile else None) as found,
        ):
            job_id = await submit(conn, {"tasks": tasks})
            deadline = time.monotonic() + opts.timeout
            while True:
                row = await conn.fetchrow(
                    "SELECT status, prepared, prepared_at, message,"
                    " extract(epoch FROM prepared_at - created_at)::float8 AS seconds"
                    " FROM herder.jobs WHERE id = $1",
                    job_id,
                )
                assert row is not None
                progress.update(bar, completed=row["prepared"])
                if row["prepared_at"] is not None or row["status"] in JOB_FINISHED:
                    break
                if time.monotonic() > deadline:
                    raise PhaseTimeout(f"preparation not done after {opts.timeout}s")
                await anyio.sleep(0.05)
            for worker in running.workers:
                worker.sample()
            rss = running.peak_rss_mb
        if row["prepared_at"] is None:
            problems.append(f"job ended {row['status']} unprepared: {row['message']}")
        count = await conn.fetchval("SELECT count(*) FROM herder.tasks WHERE job_id = $1", job_id)
        if count != tasks:
            problems.append(f"{count} tasks written, expected {tasks}")
        progress.update(bar, completed=tasks)
    finally:
        await conn.close()
        if not opts.keep_databases:
            await server.drop("herder_bench_prepare")
    seconds = row["seconds"] or float("nan")
    prepared = Prepare(
        tasks=tasks,
        seconds=seconds,
        rate=tasks / seconds,
        daemon_peak_rss_mb=rss,
        problems=problems,
    )
    return prepared, found.profile


async def soak(server: Server, opts: Options, progress: Progress) -> Soak:
    """``opts.soak`` tasks through one daemon in jobs of ``opts.soak_job_tasks``, at most
    two jobs live at once (the next is submitted when the one before last settled)."""
    total = opts.soak
    sizes = [opts.soak_job_tasks] * (total // opts.soak_job_tasks)
    if rest := total % opts.soak_job_tasks:
        sizes.append(rest)
    window = min(1_000_000, total // 3)
    name = "herder_bench_soak"
    url = await server.fresh_herder(name)
    conn = await db.connect(url)
    bar = progress.add_task(f"herder: soak {total:,} tasks", total=total)
    try:
        async with daemons("soak", url, opts) as running:
            ids: list[int] = []
            deadline = time.monotonic() + opts.timeout * max(1, total / 1_000_000)
            pending_sizes = list(sizes)
            while True:
                statuses = await conn.fetch(
                    "SELECT id, status, prepared FROM herder.jobs WHERE id = ANY($1::bigint[])"
                    " ORDER BY id",
                    ids,
                )
                live = [r for r in statuses if r["status"] not in JOB_FINISHED]
                if pending_sizes and len(live) < 2:
                    ids.append(await submit(conn, {"tasks": pending_sizes.pop(0)}))
                    continue
                if not live and not pending_sizes:
                    break
                prepared = sum(r["prepared"] for r in statuses)
                progress.update(bar, completed=prepared - await _remaining(conn))
                if time.monotonic() > deadline:
                    raise PhaseTimeout("soak did not finish in time")
                await anyio.sleep(COUNT_EVERY)
            progress.update(bar, completed=total)
            rss = running.peak_rss_mb
        overall = await job_throughput(conn, ids, total, opts.concurrency, 1)
        fractions = [window / total, (total - window) / total, 1.0]
        row = await conn.fetchrow(
            """
            SELECT extract(epoch FROM min(started_at))::float8 AS t0,
                   (SELECT array_agg(extract(epoch FROM x)::float8) FROM unnest(
                        percentile_disc($1::float8[]) WITHIN GROUP (ORDER BY ended_at)) x) AS ends
            FROM herder.tasks
            """,
            fractions,
        )
        assert row is not None
        t0, (first_end, last_start, last_end) = row["t0"], row["ends"]
        first_rate = window / (first_end - t0)
        last_rate = window / (last_end - last_start)
        bucket = 5.0
        counts = await conn.fetch(
            "SELECT floor((extract(epoch FROM ended_at) - $1) / $2)::float8 AS b,"
            " count(*) AS n FROM herder.tasks GROUP BY 1 ORDER BY 1",
            t0,
            bucket,
        )
        timeline = []
        for r in counts:
            start = r["b"] * bucket
            width = min(bucket, last_end - t0 - start)  # the last bucket is partial
            timeline.append((start, r["n"] / width if width > 0 else float("nan")))
        jobs = [
            dict(r)
            for r in await conn.fetch(
                """
                SELECT id, (payload->>'tasks')::int AS tasks,
                       extract(epoch FROM created_at)::float8 - $1 AS created,
                       extract(epoch FROM prepared_at)::float8 - $1 AS prepared,
                       extract(epoch FROM started_at)::float8 - $1 AS started,
                       extract(epoch FROM ended_at)::float8 - $1 AS ended
                FROM herder.jobs WHERE id = ANY($2::bigint[]) ORDER BY id
                """,
                t0,
                ids,
            )
        ]
        table = await table_stats(conn)
    finally:
        await conn.close()
        if not opts.keep_databases:
            await server.drop(name)
    return Soak(
        tasks=total,
        jobs=len(sizes),
        window=window,
        first_rate=first_rate,
        last_rate=last_rate,
        ratio=last_rate / first_rate,
        run_seconds=overall.run_seconds,
        rate=overall.rate,
        daemon_peak_rss_mb=rss,
        timeline=timeline,
        job_times=jobs,
        table=table,
        problems=overall.problems,
    )


async def table_stats(conn: db.Connection) -> dict[str, float]:
    row = await conn.fetchrow(
        """
        SELECT pg_total_relation_size('herder.tasks') / 1048576.0 AS tasks_total_mb,
               pg_relation_size('herder.tasks_pending_idx') / 1048576.0 AS pending_idx_mb,
               pg_relation_size('herder.tasks_running_idx') / 1048576.0 AS running_idx_mb,
               n_live_tup, n_dead_tup, autovacuum_count, autoanalyze_count
        FROM pg_stat_user_tables WHERE schemaname = 'herder' AND relname = 'tasks'
        """
    )
    return {} if row is None else {k: float(v) for k, v in row.items()}


async def scale_out(server: Server, opts: Options, progress: Progress) -> ScaleOut:
    """The same job of ``task_ms`` tasks through one daemon, then ``opts.daemons``."""
    payload = {"tasks": opts.daemon_tasks, "task_ms": opts.daemon_task_ms}
    results: list[Throughput] = []
    for count in (1, opts.daemons):
        name = f"herder_bench_scale_{count}"
        url = await server.fresh_herder(name)
        conn = await db.connect(url)
        try:
            async with daemons(f"scale{count}", url, opts, count) as running:
                label = f"herder: {count} daemon(s), {opts.daemon_tasks:,} tasks of "
                label += f"{opts.daemon_task_ms:g} ms"
                result, _ = await run_job(
                    conn, running, payload, opts, progress, label, postmaster=server.postmaster
                )
                results.append(result)
        finally:
            await conn.close()
            if not opts.keep_databases:
                await server.drop(name)
    return ScaleOut(
        tasks=opts.daemon_tasks,
        task_ms=opts.daemon_task_ms,
        daemons=opts.daemons,
        one=results[0],
        many=results[1],
    )
