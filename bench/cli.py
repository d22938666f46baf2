"""``python -m bench``: herder and Procrastinate side by side on one PostgreSQL."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import anyio
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from bench import herder_runs, procs
from bench.dbs import Server
from bench.options import Options
from bench.report import Results
from bench.sysstat import CpuMeter, cores

DEFAULT_OUTPUT = procs.ROOT / "bench" / "results.json"


def parse_args(argv: list[str] | None) -> Options:
    d = Options()
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark herder against Procrastinate on one PostgreSQL (the embedded "
        "one unless DATABASE_URL is set; the benchmark creates and drops its own databases "
        "there). Prints a table and writes bench/results.json.",
    )
    add = parser.add_argument
    add("--tasks", type=int, help=f"herder throughput: no-op tasks in one job ({d.tasks:,})")
    add(
        "--procrastinate-tasks",
        type=int,
        help=f"procrastinate throughput: no-op jobs ({d.procrastinate_tasks:,}; it runs ~500/s, "
        "so it gets fewer: rates are per second)",
    )
    add("--concurrency", type=int, default=d.concurrency, help="per worker process (%(default)s)")
    add(
        "--prefetch",
        type=int,
        help="herder daemons' local queue bound (default: the daemon's own default)",
    )
    add(
        "--prepare-tasks",
        type=int,
        default=d.prepare_tasks,
        help="herder: tasks in the big job whose preparation is timed; 0 skips (%(default)s)",
    )
    add(
        "--latency-samples",
        type=int,
        default=d.latency_samples,
        help="single-task jobs per system, one at a time on an idle worker; 0 skips (%(default)s)",
    )
    add(
        "--latency-interval",
        type=float,
        default=d.latency_interval,
        help="seconds between latency jobs (%(default)s)",
    )
    add("--skip-procrastinate", action="store_true")
    add("--skip-herder", action="store_true", help="only procrastinate")
    add("--only-history", action="store_true", help="herder's history phase alone")
    add("--skip-sharing", action="store_true", help="skip the sharing phase")
    add(
        "--soak",
        type=int,
        help="herder: push this many tasks through one daemon (off; --full: 3M)",
    )
    add("--soak-job-tasks", type=int, default=d.soak_job_tasks, help="per soak job (%(default)s)")
    add(
        "--daemons",
        type=int,
        help="herder: also run N daemons on one database, tasks of --daemon-task-ms, "
        "against one daemon (off; --full: 3)",
    )
    add("--daemon-tasks", type=int, default=d.daemon_tasks, help="per scale-out run (%(default)s)")
    add(
        "--daemon-task-ms",
        type=float,
        default=d.daemon_task_ms,
        help="sleep in each scale-out task (%(default)s)",
    )
    add(
        "--history-tasks",
        type=int,
        help="herder: finished tasks built before the workloads run again; 0 skips "
        f"({d.history_tasks:,}; --full: 10M)",
    )
    add(
        "--full",
        action="store_true",
        help="everything, at volume: 300k tasks, 10k procrastinate jobs, --soak 3000000, "
        "--daemons 3",
    )
    add("--timeout", type=float, default=d.timeout, help="per phase, seconds (%(default)s)")
    add("--log-level", default=d.log_level, help="of the worker processes (%(default)s)")
    add(
        "--profile",
        action="store_true",
        help="py-spy the herder daemon during the throughput and preparation runs "
        "(.herder/bench-logs/profile-herder-*.txt; needs py-spy) and sample "
        "pg_stat_activity for the statements the database spends its time in",
    )
    add("--output", type=Path, default=DEFAULT_OUTPUT, help="(bench/results.json)")
    add("--keep-databases", action="store_true", help="do not drop the bench databases")
    a = parser.parse_args(argv)
    full = a.full
    return Options(
        tasks=a.tasks or (300_000 if full else d.tasks),
        procrastinate_tasks=a.procrastinate_tasks or (10_000 if full else d.procrastinate_tasks),
        concurrency=a.concurrency,
        prefetch=a.prefetch,
        prepare_tasks=a.prepare_tasks,
        latency_samples=a.latency_samples,
        latency_interval=a.latency_interval,
        skip_procrastinate=a.skip_procrastinate,
        skip_herder=a.skip_herder,
        only_history=a.only_history,
        skip_sharing=a.skip_sharing,
        soak=a.soak if a.soak is not None else (3_000_000 if full else 0),
        soak_job_tasks=a.soak_job_tasks,
        daemons=a.daemons if a.daemons is not None else (3 if full else 0),
        daemon_tasks=a.daemon_tasks,
        daemon_task_ms=a.daemon_task_ms,
        history_tasks=a.history_tasks
        if a.history_tasks is not None
        else (10_000_000 if full else d.history_tasks),
        full=full,
        timeout=a.timeout,
        log_level=a.log_level,
        profile=a.profile,
        output=a.output,
        keep_databases=a.keep_databases,
    )


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], check=False, capture_output=True, text=True, cwd=procs.ROOT, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _psycopg_impl() -> str | None:
    """python, binary or c: Procrastinate's driver is much slower in pure Python."""
    try:
        import psycopg
    except ImportError:
        return None
    return str(psycopg.pq.__impl__)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


async def _run(opts: Options, server: Server, results: Results, console: Console) -> None:
    results.meta["postgres_version"] = await server.version()
    results.meta["postgres_cpu_measured"] = await server.find_postmaster() is not None
    # Another process eating CPU skews everything below: measure it and say so.
    meter = CpuMeter()
    await anyio.sleep(1.0)
    background = results.meta["background_cpu_busy"] = round(meter.stop(), 3)
    results.meta["loadavg_1m"] = os.getloadavg()[0]
    if background > 0.15:
        console.print(
            f"[yellow]warning: the machine was {background:.0%} busy before the benchmark "
            "started; figures will be low and noisy[/yellow]"
        )
    columns = (
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:

        async def phase(name: str, body: Any) -> None:
            try:
                await body()
            except Exception as exc:
                results.errors[name] = f"{type(exc).__name__}: {exc}"
                console.print(f"[red]{name} failed:[/red] {type(exc).__name__}: {exc}")

        async def herder_main() -> None:
            latency, throughput, rss, profile = await herder_runs.latency_and_throughput(
                server, opts, progress
            )
            results.herder_latency, results.herder_throughput = latency, throughput
            results.herder_rss_mb["throughput"] = rss
            if profile:
                results.profiles["throughput"] = profile

        async def procrastinate_main() -> None:
            from bench import procrastinate_runs

            latency, throughput, rss = await procrastinate_runs.run(server, opts, progress)
            results.procrastinate_latency, results.procrastinate_throughput = latency, throughput
            results.procrastinate_rss_mb = rss

        async def prepare() -> None:
            results.prepare, profile = await herder_runs.prepare_big_job(server, opts, progress)
            if profile:
                results.profiles["prepare"] = profile
            results.herder_rss_mb["prepare"] = results.prepare.daemon_peak_rss_mb

        async def scale_out() -> None:
            results.scale_out = await herder_runs.scale_out(server, opts, progress)

        async def history_phase() -> None:
            from bench import history

            results.history = await history.history(server, opts, progress)

        async def sharing_phase() -> None:
            from bench import sharing

            results.sharing = await sharing.sharing(server, opts, progress)

        async def soak() -> None:
            results.soak = await herder_runs.soak(server, opts, progress)
            results.herder_rss_mb["soak"] = results.soak.daemon_peak_rss_mb

        if opts.only_history:
            await phase("herder history", history_phase)
            return
        if not opts.skip_herder:
            await phase("herder throughput/latency", herder_main)
        if not opts.skip_procrastinate:
            await phase("procrastinate", procrastinate_main)
        if not opts.skip_herder and opts.prepare_tasks:
            await phase("herder preparation", prepare)
        if not opts.skip_herder and opts.daemons >= 2:
            await phase("herder scale-out", scale_out)
        if not opts.skip_herder and opts.soak:
            await phase("herder soak", soak)
        if not opts.skip_herder and not opts.skip_sharing:
            await phase("herder sharing", sharing_phase)
        if not opts.skip_herder and opts.history_tasks:
            await phase("herder history", history_phase)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    # pgserver asks platformdirs for a runtime dir that containers often lack; harmless.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    # Piped output (CI, a README paste) gets a table wide enough not to wrap every cell.
    console = Console() if sys.stdout.isatty() else Console(width=120)
    started = time.monotonic()
    results = Results()
    results.meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "machine": platform.machine(),
        "cores": cores(),
        "python": platform.python_version(),
        "herder_commit": _git("rev-parse", "--short", "HEAD"),
        "herder_tree_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "procrastinate_version": _version("procrastinate"),
        "asyncpg_version": _version("asyncpg"),
        "psycopg_version": _version("psycopg"),
        "psycopg_impl": _psycopg_impl(),
        "concurrency": opts.concurrency,
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(opts).items()},
    }
    if not opts.skip_procrastinate and results.meta["psycopg_impl"] == "python":
        console.print(
            "[yellow]note: psycopg runs its pure-Python implementation; Procrastinate is "
            "faster with psycopg[binary] installed[/yellow]"
        )
    with console.status("starting PostgreSQL"):
        server = Server.provision()
    results.meta["embedded"] = server.embedded
    try:
        anyio.run(_run, opts, server, results, console)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]")
        return 130
    finally:
        try:
            if not opts.keep_databases:
                anyio.run(server.drop_all)
        finally:
            server.close()
    results.meta["duration_seconds"] = round(time.monotonic() - started, 1)
    results.print(console)
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    opts.output.write_text(json.dumps(results.as_json(), indent=2, allow_nan=False, default=str))
    console.print(
        f"wrote {os.path.relpath(opts.output)} in {results.meta['duration_seconds']:.0f} s; "
        f"worker logs in {os.path.relpath(procs.LOG_DIR)}"
    )
    return 1 if results.errors else 0


if __name__ == "__main__":
    sys.exit(main())
