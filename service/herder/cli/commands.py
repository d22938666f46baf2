"""The ``herder`` commands: migrate, run the daemon, submit, inspect and control jobs.

Each command is one async function taking the parsed arguments and the database URL.
``main`` turns every expected failure (bad input, a database that does not answer, a job
in the wrong state) into one ``error: ...`` line on stderr and a non-zero exit, so users
never see a traceback (``--log-level debug`` shows it).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import sys
import traceback
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractContextManager, asynccontextmanager, nullcontext
from functools import partial
from pathlib import Path

import anyio
import asyncpg
import structlog

from herder import db, logs
from herder.cli.options import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    CliError,
    build_parser,
)
from herder.cli.render import (
    Job,
    emit,
    fleet_table,
    jobs_table,
    print_job,
    print_json,
    progress_bar,
    settled,
    stdout,
)
from herder.errors import innermost
from herder.eventloop import event_loop_options
from herder.kinds import KindError
from herder.resilience import TRANSIENT, Backoff
from herder.states import JobStatus
from herder.store import CONTROL_ACTIONS, Store

log = structlog.get_logger("herder.cli")

#: How often a progress bar re-reads its job.
POLL_SECONDS = 0.2
#: A database that has not answered by then is reported, not waited for.
CONNECT_TIMEOUT = 10.0

DEMO_PAYLOAD = {"tasks": 2000, "task_ms": 2, "warn": [7], "flaky": [3, 11]}
SUBMIT_SQL = (
    "INSERT INTO herder.jobs (kind, payload) VALUES ('synthetic', '{\"tasks\": 100}') RETURNING id;"
)


# ---------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error already printed
        return exit_.code if isinstance(exit_.code, int) else 0
    except CliError as exc:  # a malformed HERDER_* variable
        return _report(exc)
    level = args.log_level or ("INFO" if args.command == "run" else "WARNING")
    logs.configure(level)
    try:
        url = _database_url(args)
        code: int = anyio.run(
            COMMANDS[args.command],
            args,
            url,
            backend="asyncio",
            backend_options=event_loop_options(),
        )
        return code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:
        if level == "DEBUG":
            traceback.print_exception(exc)
        return _report(innermost(exc))


def _database_url(args: argparse.Namespace) -> str:
    if args.database_url:
        return str(args.database_url)
    # A demo should just work on a bare machine; everything else must be asked for.
    if args.embedded or args.command == "demo":
        from herder import embedded

        with warnings.catch_warnings():  # pgserver's platformdirs noise about XDG dirs
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
            url, _server = embedded.start()
        return url
    raise CliError(
        "no database: set DATABASE_URL, pass --database-url, or add --embedded", EXIT_USAGE
    )


def _report(exc: BaseException) -> int:
    code = EXIT_FAILED
    if isinstance(exc, CliError):
        message, code = str(exc), exc.code
    elif isinstance(exc, BrokenPipeError):  # `herder jobs | head`: nobody is listening
        return code
    elif isinstance(
        exc,
        asyncpg.UndefinedTableError
        | asyncpg.InvalidSchemaNameError
        | asyncpg.UndefinedFunctionError,
    ):
        message = f"{exc} (is the schema applied? run 'herder migrate')"
    elif isinstance(exc, asyncpg.ClientConfigurationError):
        message = f"bad database URL: {exc}"
    elif isinstance(exc, OSError | asyncpg.PostgresConnectionError | asyncpg.InterfaceError):
        message = f"cannot reach the database: {exc}"
    elif isinstance(exc, asyncpg.PostgresError):
        message = f"database error: {exc}"
    elif isinstance(exc, KindError):
        message = str(exc)
    else:
        message = f"{type(exc).__name__}: {exc}"
    # One line, whatever the driver put in its message.
    print("error: " + " ".join(message.split()), file=sys.stderr)
    return code


# ---------------------------------------------------------------- database access


async def _connect(url: str) -> db.Connection:
    # TimeoutError is an OSError, so a silent server is reported as unreachable.
    try:
        with anyio.fail_after(CONNECT_TIMEOUT):
            return await db.connect(url)
    except TimeoutError:
        raise TimeoutError(f"no answer within {CONNECT_TIMEOUT:g}s") from None


@asynccontextmanager
async def _open_store(url: str) -> AsyncIterator[Store]:
    try:
        with anyio.fail_after(CONNECT_TIMEOUT):
            pool = await db.create_pool(url, min_size=1, max_size=2)
    except TimeoutError:
        raise TimeoutError(f"no answer within {CONNECT_TIMEOUT:g}s") from None
    try:
        yield Store(pool)
    finally:
        await pool.close()


async def _migrate(url: str) -> int:
    conn = await _connect(url)
    try:
        return await db.migrate(conn)
    finally:
        await conn.close()


async def _require_job(store: Store, job_id: int) -> Job:
    job = await store.get_job(job_id)
    if job is None:
        raise CliError(f"job {job_id} does not exist")
    return job


def _exit_code(job: Job) -> int:
    return 0 if job["status"] in (JobStatus.SUCCESS, JobStatus.WARNING) else EXIT_FAILED


# ---------------------------------------------------------------- commands


async def cmd_migrate(args: argparse.Namespace, url: str) -> int:
    version = await _migrate(url)
    emit(args.json, {"schema_version": version}, f"schema version {version}")
    return 0


async def cmd_run(args: argparse.Namespace, url: str) -> int:
    from herder.daemon import Daemon, DaemonConfig

    # Built first so that a bad --app fails before anything touches the database.
    daemon = Daemon(
        DaemonConfig(
            database_url=url,
            concurrency=args.concurrency,
            apps=args.apps,
            health_addr=args.health_addr,
            lease_seconds=args.lease_seconds,
            poll_interval=args.poll_interval,
            shutdown_timeout=args.shutdown_timeout,
            listen=not args.no_listen,
            fair_sharing=not args.no_fair_sharing,
            prefetch=args.prefetch,
            name=args.name,
            retention_seconds=args.retention,
        )
    )
    version = await _migrate_when_reachable(url)
    log.info("schema applied", version=version)
    async with anyio.create_task_group() as tg:
        await tg.start(partial(daemon.run, handle_signals=True))
        # Stderr, as plain text: the log stream stays parseable and the line pasteable.
        print(f"herder is serving; submit a job with:\n  {_submit_hint(url)}", file=sys.stderr)
    return 0


async def _migrate_when_reachable(url: str) -> int:
    """Like the daemon itself, wait for a database that is not up yet (a service
    manager may start herder first); errors that waiting cannot fix end the command."""
    backoff = Backoff(0.5, 5.0)
    while True:
        try:
            return await _migrate(url)
        except TRANSIENT as exc:
            log.warning("database unreachable; retrying", error=str(exc))
            await backoff.wait()


def _submit_hint(url: str) -> str:
    return f"{_psql()} {_double_quoted(url)} -c {_double_quoted(SUBMIT_SQL)}"


def _psql() -> str:
    if shutil.which("psql"):
        return "psql"
    import pgserver

    bundled = Path(pgserver.__file__).parent / "pginstall" / "bin" / "psql"
    return shlex.quote(str(bundled)) if bundled.exists() else "psql"


def _double_quoted(text: str) -> str:
    """Quote for a POSIX shell the way people write psql lines by hand: "...\\"..."."""
    return '"' + re.sub(r'([\\"$`])', r"\\\1", text) + '"'


async def cmd_submit(args: argparse.Namespace, url: str) -> int:
    async with _open_store(url) as store:
        job_id = await store.submit(
            args.kind, args.payload, priority=args.priority, unverified=args.unverified
        )
        if not args.wait:
            emit(args.json, {"id": job_id}, str(job_id))
            return 0
        if not args.json:
            print(job_id, flush=True)  # the id first, so it is known even after ^C
        job = await watch_job(store, job_id, bar=not args.json)
        problems = await store.job_problems(job_id)
    print_job(job, problems, as_json=args.json, brief=True)
    return _exit_code(job)


async def cmd_fleet(args: argparse.Namespace, url: str) -> int:
    async with _open_store(url) as store:
        daemons = await store.daemons()
    if args.json:
        print_json(daemons)
    elif not daemons:
        print("no live daemon")
    else:
        stdout().print(fleet_table(daemons))
    return 0


async def cmd_jobs(args: argparse.Namespace, url: str) -> int:
    status = None if args.status is None else args.status.value
    async with _open_store(url) as store:
        jobs = await store.list_jobs(
            status, args.limit, kind=args.kind, owner=args.owner, since=args.since
        )
    if args.json:
        print_json(jobs)
    elif not jobs:
        print("no jobs" + (f" with status {status}" if status else ""))
    else:
        stdout().print(jobs_table(jobs))
    return 0


async def cmd_prune(args: argparse.Namespace, url: str) -> int:
    async with _open_store(url) as store:
        jobs, tasks = await store.prune(args.retention)
    emit(
        args.json,
        {"jobs_deleted": jobs, "tasks_deleted": tasks},
        f"deleted {jobs} finished jobs older than {args.retention:g}s and their {tasks} tasks",
    )
    return 0


async def cmd_show(args: argparse.Namespace, url: str) -> int:
    async with _open_store(url) as store:
        if args.follow:
            job = await watch_job(store, args.job_id, bar=not args.json)
        else:
            job = await _require_job(store, args.job_id)
        problems = await store.job_problems(args.job_id)
    print_job(job, problems, as_json=args.json, brief=False)
    return _exit_code(job) if args.follow else 0


async def cmd_control(args: argparse.Namespace, url: str) -> int:
    job_id, action = args.job_id, args.command
    async with _open_store(url) as store:
        applied = await store.control(action, job_id)
        job = await store.get_job(job_id)
    status = None if job is None else job["status"]
    if args.json:
        print_json({"id": job_id, "action": action, "applied": applied, "status": status})
    if job is None and not applied:
        raise CliError(f"job {job_id} does not exist")
    if not applied:
        raise CliError(f"job {job_id} is {status}; {action} does not apply")
    if not args.json:
        print(f"job {job_id}: {action} applied" + (f", now {status}" if status else ""))
    return 0


async def cmd_demo(args: argparse.Namespace, url: str) -> int:
    from herder.daemon import Daemon, DaemonConfig

    await _migrate(url)
    async with _open_store(url) as store:
        async with anyio.create_task_group() as tg:
            # Port 0: a `herder run` on the default port must not stop the demo.
            daemon = Daemon(DaemonConfig(database_url=url, health_addr="127.0.0.1:0"))
            await tg.start(daemon.run)
            try:
                job_id = await store.submit("synthetic", DEMO_PAYLOAD)
                if not args.json:
                    print(f"demo job {job_id}: synthetic {json.dumps(DEMO_PAYLOAD)}")
                job = await watch_job(store, job_id, bar=not args.json)
            finally:
                daemon.request_stop()
        problems = await store.job_problems(job_id)
    print_job(job, problems, as_json=args.json, brief=True)
    if not args.json:
        print(f"\nlook again with: herder --database-url {_double_quoted(url)} show {job_id}")
    return _exit_code(job)


async def watch_job(store: Store, job_id: int, *, bar: bool) -> Job:
    """Re-read the job every POLL_SECONDS until it settles and return it; with ``bar``,
    draw a live progress bar on stderr meanwhile (stdout stays for results).

    The one progress display of submit --wait, show --follow and demo.
    """
    shown: AbstractContextManager[Callable[[Job], None]] = (
        progress_bar(job_id) if bar else nullcontext(lambda job: None)
    )
    with shown as draw:
        while True:
            job = await _require_job(store, job_id)
            draw(job)
            if settled(job):
                return job
            await anyio.sleep(POLL_SECONDS)


COMMANDS: dict[str, Callable[[argparse.Namespace, str], Awaitable[int]]] = {
    "migrate": cmd_migrate,
    "run": cmd_run,
    "submit": cmd_submit,
    "jobs": cmd_jobs,
    "prune": cmd_prune,
    "show": cmd_show,
    **dict.fromkeys(CONTROL_ACTIONS, cmd_control),
    "fleet": cmd_fleet,
    "demo": cmd_demo,
}
