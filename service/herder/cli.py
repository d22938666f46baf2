"""The ``herder`` command line: migrate, run the daemon, submit, inspect and control jobs.

Each command is one async function taking the parsed arguments and the database URL.
``main`` turns every expected failure (bad input, a database that does not answer, a job
in the wrong state) into one ``error: ...`` line on stderr and a non-zero exit, so users
never see a traceback (``--log-level debug`` shows it).

Every flag has an environment variable ``HERDER_<FLAG>`` as its default (see
``add_option``), so a systemd unit or a container can configure herder without flags.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import sys
import traceback
import warnings
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import anyio
import asyncpg
import structlog
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from herder import db, logs
from herder.db import Undecodable
from herder.eventloop import event_loop_options
from herder.kinds import KindError
from herder.resilience import TRANSIENT
from herder.states import JOB_FINISHED, JobStatus
from herder.store import CONTROL_ACTIONS, Store

log = structlog.get_logger("herder.cli")

Job = dict[str, Any]
N = TypeVar("N", int, float)

#: How often a progress bar re-reads its job.
POLL_SECONDS = 0.2
#: A database that has not answered by then is reported, not waited for.
CONNECT_TIMEOUT = 10.0
#: Exit codes: 1 for "it did not work out", 2 for usage errors (as argparse), 130 for ^C.
EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130

DEMO_PAYLOAD = {"tasks": 2000, "task_ms": 2, "warn": [7], "flaky": [3, 11]}
SUBMIT_SQL = (
    "INSERT INTO herder.jobs (kind, payload) VALUES ('synthetic', '{\"tasks\": 100}') RETURNING id;"
)
CONTROL_HELP = {
    "cancel": "cancel a job: pending tasks at once, running ones within a second",
    "resume": "run the canceled tasks of a CANCELED job again",
    "retry": "run the failed tasks of a FAILURE job again",
    "restart": "prepare a finished job afresh",
    "verify": "let an UNVERIFIED job be prepared",
}
STATUS_STYLES = {
    "SUCCESS": "green",
    "WARNING": "yellow",
    "FAILURE": "red",
    "CANCELED": "magenta",
    "CANCELING": "magenta",
}
#: Task counts as the bar and the tables show them, in this order.
COUNT_COLUMNS = (
    ("pending", "pending", "default"),
    ("in_progress", "in progress", "cyan"),
    ("success", "success", "green"),
    ("warning", "warning", "yellow"),
    ("failure", "failure", "red"),
    ("canceled", "canceled", "magenta"),
)


class CliError(Exception):
    """An expected failure: reported as one line, exit ``code``."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


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
            args.handler, args, url, backend="asyncio", backend_options=event_loop_options()
        )
        return code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:
        if level == "DEBUG":
            traceback.print_exception(exc)
        return _report(_innermost(exc))


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


def _innermost(exc: BaseException) -> BaseException:
    """The first real error inside the exception groups a task group wraps it in."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


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


# ---------------------------------------------------------------- arguments


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line instead of argparse's usage block: scripts log it, people read it.
        self.exit(EXIT_USAGE, f"error: {message} (see '{self.prog} --help')\n")


def env_var(flag: str) -> str:
    """The variable behind a flag: ``--poll-interval`` -> ``HERDER_POLL_INTERVAL``."""
    return "HERDER_" + flag.lstrip("-").replace("-", "_").upper()


def add_option(
    parser: argparse.ArgumentParser, flag: str, env: Mapping[str, str], **kwargs: Any
) -> None:
    """Add ``flag`` with its default taken from ``HERDER_<FLAG>`` when that is set.

    A string default goes through the option's ``type`` exactly like a typed value
    (argparse converts string defaults), so a bad variable gets the same error as a bad
    flag, and only when the command that has the flag runs. Switches take 1/0, true/false,
    yes/no, on/off; repeatable options a comma-separated list.
    """
    name = env_var(flag)
    raw = env.get(name)
    if raw is not None:
        action = kwargs.get("action")
        if action == "store_true":
            kwargs["default"] = _env_bool(name, raw)
        elif action is _Repeatable:
            kwargs["default"] = [item.strip() for item in raw.split(",") if item.strip()]
        else:
            kwargs["default"] = raw
    kwargs["help"] = f"{kwargs.get('help', '')} [env {name}]".strip()
    parser.add_argument(flag, **kwargs)


def _env_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise CliError(f"{name}={raw!r} is not a switch (use 1 or 0)", EXIT_USAGE)


class _Repeatable(argparse.Action):
    """Like ``action="append"``, but values on the command line replace the default (from
    the environment) instead of adding to it."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        current = getattr(namespace, self.dest, None)
        items = [] if current is self.default else list(current or [])
        setattr(namespace, self.dest, [*items, values])


def _number(convert: Callable[[str], N], noun: str, low: N, high: N | None = None) -> Any:
    """An argparse type: a number in [low, high], else an error naming what was wanted."""

    def parse(text: str) -> N:
        wrong = argparse.ArgumentTypeError(f"expected {noun}, got {text!r}")
        try:
            value = convert(text)
        except ValueError:
            raise wrong from None
        # `not low <= value` also rejects NaN.
        if not low <= value or (high is not None and value > high):
            raise wrong
        return value

    return parse


_positive_int = _number(int, "an integer >= 1", 1)
_job_id = _number(int, "a job id (an integer >= 1)", 1, 2**63 - 1)
_priority = _number(int, "an integer priority", -(2**31), 2**31 - 1)
_seconds = _number(float, "a number of seconds >= 0", 0.0)
_positive_seconds = _number(float, "a number of seconds >= 0.001", 1e-3)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> float:
    """Seconds from "90", "90s", "15m", "12h" or "30d"."""
    match = _DURATION.match(text.lower())
    if not match:
        raise argparse.ArgumentTypeError(
            f"expected a duration such as 90s, 15m, 12h or 30d, got {text!r}"
        )
    return float(match[1]) * _UNIT_SECONDS[match[2]]


def _since(text: str) -> datetime:
    """A moment: an ISO date or datetime, or a duration meaning that long ago."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        try:
            return datetime.now(UTC) - timedelta(seconds=_duration(text))
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(
                f"expected an ISO date/datetime or a duration such as 2h, got {text!r}"
            ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _host_port(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not (sep and host and port.isdigit() and int(port) < 65536):
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return text


def _job_status(text: str) -> JobStatus:
    try:
        return JobStatus(text.upper())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"unknown status {text!r} (one of {', '.join(JobStatus)})"
        ) from None


def _json_payload(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"invalid JSON ({exc}): {text!r}") from None


def _add_global_options(
    parser: argparse.ArgumentParser, env: Mapping[str, str], *, top: bool
) -> None:
    """The options every command takes. They are declared again on each subcommand so
    they may follow it; there they default to "not given", keeping the value (or the
    environment's default) from before the subcommand."""

    def add(flag: str, **kwargs: Any) -> None:
        if top:
            add_option(parser, flag, env, **kwargs)
        else:
            parser.add_argument(flag, **{**kwargs, "default": argparse.SUPPRESS})

    add(
        "--database-url",
        default=env.get("DATABASE_URL"),
        metavar="URL",
        help="libpq URL of the database (default: $DATABASE_URL)",
    )
    add("--embedded", action="store_true", help="without a URL, use an embedded PostgreSQL")
    add("--json", action="store_true", help="machine-readable output on stdout")
    add(
        "--log-level",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        default=None,
        help="default INFO for run, WARNING otherwise",
    )


def build_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    env = os.environ if env is None else env
    parser = _Parser(prog="herder", description="PostgreSQL-backed jobs and tasks.")
    _add_global_options(parser, env, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Any, summary: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=summary, description=summary)
        _add_global_options(sub, env, top=False)
        sub.set_defaults(handler=handler)
        return sub

    command("migrate", cmd_migrate, "apply the schema (safe to repeat); print its version")

    run = command("run", cmd_run, "migrate, then run the daemon in the foreground")
    _add_run_options(run, env)
    submit = command("submit", cmd_submit, "submit a job; print its id")
    _add_submit_options(submit, env)

    jobs = command("jobs", cmd_jobs, "list the latest jobs")
    add_option(jobs, "--status", env, type=_job_status, default=None, help="only this status")
    add_option(jobs, "--limit", env, type=_positive_int, default=50, help="at most this many")
    add_option(jobs, "--kind", env, default=None, help="only jobs of this kind")
    add_option(jobs, "--owner", env, default=None, help="only jobs of this owner (role)")
    add_option(
        jobs,
        "--since",
        env,
        type=_since,
        default=None,
        help="only jobs created since: an ISO date/datetime, or a duration (2h, 7d) ago",
    )

    prune = command("prune", cmd_prune, "delete finished jobs older than the retention")
    add_option(
        prune,
        "--retention",
        env,
        type=_duration,
        default=_duration("30d"),
        help="age of finished jobs to delete: 90s, 15m, 12h, 30d (default 30d)",
    )

    show = command("show", cmd_show, "a job's fields, task counts and latest problems")
    show.add_argument("job_id", metavar="JOB_ID", type=_job_id)
    add_option(
        show,
        "--follow",
        env,
        action="store_true",
        help="show progress until the job settles; exit as submit --wait",
    )

    for action in CONTROL_ACTIONS:
        control = command(action, cmd_control, CONTROL_HELP[action])
        control.add_argument("job_id", metavar="JOB_ID", type=_job_id)
        control.set_defaults(action=action)

    command("demo", cmd_demo, "run a demo job in an in-process daemon and show it")
    return parser


def _add_run_options(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    opt = partial(add_option, parser, env=env)
    opt(
        "--concurrency",
        type=_positive_int,
        default=10,
        metavar="N",
        help="tasks run at once (default %(default)s)",
    )
    opt(
        "--app",
        dest="apps",
        action=_Repeatable,
        default=[],
        metavar="MODULE",
        help="import MODULE to register its kinds (repeatable)",
    )
    opt(
        "--health-addr",
        type=_host_port,
        default="127.0.0.1:9464",
        metavar="HOST:PORT",
        help="address of /healthz and /metrics (default %(default)s)",
    )
    opt(
        "--lease-seconds",
        type=_positive_seconds,
        default=30.0,
        metavar="S",
        help="a dead worker's tasks run again after this (default %(default)s)",
    )
    opt(
        "--poll-interval",
        type=_positive_seconds,
        default=1.0,
        metavar="S",
        help="poll this often besides LISTEN/NOTIFY (default %(default)s)",
    )
    opt(
        "--shutdown-timeout",
        type=_seconds,
        default=30.0,
        metavar="S",
        help="on SIGTERM, let running tasks finish this long (default %(default)s)",
    )
    opt("--no-listen", action="store_true", help="poll only (behind a transaction pooler)")
    opt(
        "--prefetch",
        type=_positive_int,
        default=None,
        metavar="N",
        help="tasks claimed ahead of free workers",
    )
    opt(
        "--retention",
        type=_duration,
        default=_duration("30d"),
        metavar="AGE",
        help="prune finished jobs older than this: 90s, 15m, 12h, 30d; 0 keeps all (default 30d)",
    )


def _add_submit_options(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    opt = partial(add_option, parser, env=env)
    parser.add_argument("kind", metavar="KIND")
    parser.add_argument(
        "payload",
        metavar="PAYLOAD",
        nargs="?",
        type=_json_payload,
        default="{}",
        help="JSON (default {})",
    )
    opt("--priority", type=_priority, default=0, help="higher runs first")
    opt("--unverified", action="store_true", help="hold the job until `herder verify`")
    opt(
        "--wait",
        action="store_true",
        help="show progress until the job settles; exit 0 on SUCCESS or WARNING",
    )


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


def _settled(job: Job) -> bool:
    return JobStatus(job["status"]) in JOB_FINISHED


def _exit_code(job: Job) -> int:
    return 0 if job["status"] in (JobStatus.SUCCESS, JobStatus.WARNING) else EXIT_FAILED


# ---------------------------------------------------------------- commands


async def cmd_migrate(args: argparse.Namespace, url: str) -> int:
    version = await _migrate(url)
    _emit(args, {"schema_version": version}, f"schema version {version}")
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
            prefetch=args.prefetch,
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
    delay = 0.5
    while True:
        try:
            return await _migrate(url)
        except TRANSIENT as exc:
            log.warning("database unreachable; retrying", error=str(exc), retry_in=delay)
            await anyio.sleep(delay)
            delay = min(delay * 2, 5.0)


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
            _emit(args, {"id": job_id}, str(job_id))
            return 0
        if not args.json:
            print(job_id, flush=True)  # the id first, so it is known even after ^C
        job = await watch_job(store, job_id, bar=not args.json)
        problems = await store.job_problems(job_id)
    _print_job(args, job, problems, brief=True)
    return _exit_code(job)


async def cmd_jobs(args: argparse.Namespace, url: str) -> int:
    status = None if args.status is None else args.status.value
    async with _open_store(url) as store:
        jobs = await store.list_jobs(
            status, args.limit, kind=args.kind, owner=args.owner, since=args.since
        )
    if args.json:
        _print_json(jobs)
    elif not jobs:
        print("no jobs" + (f" with status {status}" if status else ""))
    else:
        _stdout().print(_jobs_table(jobs))
    return 0


async def cmd_prune(args: argparse.Namespace, url: str) -> int:
    async with _open_store(url) as store:
        jobs, tasks = await store.prune(args.retention)
    _emit(
        args,
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
    _print_job(args, job, problems, brief=False)
    return _exit_code(job) if args.follow else 0


async def cmd_control(args: argparse.Namespace, url: str) -> int:
    job_id, action = args.job_id, args.action
    async with _open_store(url) as store:
        applied = await store.control(action, job_id)
        job = await store.get_job(job_id)
    status = None if job is None else job["status"]
    if args.json:
        _print_json({"id": job_id, "action": action, "applied": applied, "status": status})
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
    _print_job(args, job, problems, brief=True)
    if not args.json:
        print(f"\nlook again with: herder --database-url {_double_quoted(url)} show {job_id}")
    return _exit_code(job)


# ---------------------------------------------------------------- output


async def watch_job(store: Store, job_id: int, *, bar: bool) -> Job:
    """Re-read the job every POLL_SECONDS until it settles and return it; with ``bar``,
    draw a live progress bar on stderr meanwhile (stdout stays for results).

    The one progress display of submit --wait, show --follow and demo.
    """
    if not bar:
        return await _poll_until_settled(store, job_id, lambda job: None)
    progress = Progress(
        TextColumn("job {task.fields[job_id]} {task.fields[status]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[counts]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True, highlight=False),
    )
    with progress:
        task = progress.add_task("", total=None, job_id=job_id, status="", counts="")

        def draw(job: Job) -> None:
            # An unknown total (still preparing, no tasks yet) draws a pulsing bar.
            total = job["total"] or (0 if _settled(job) else None)
            progress.update(
                task,
                total=total,
                completed=_finished_tasks(job),
                status=_styled_status(job["status"]),
                counts=_counts_markup(job),
            )

        return await _poll_until_settled(store, job_id, draw)


async def _poll_until_settled(store: Store, job_id: int, draw: Callable[[Job], None]) -> Job:
    while True:
        job = await _require_job(store, job_id)
        draw(job)
        if _settled(job):
            return job
        await anyio.sleep(POLL_SECONDS)


def _finished_tasks(job: Job) -> int:
    return int(job["total"] - job["pending"] - job["in_progress"])


def _styled_status(status: str) -> str:
    return f"[{STATUS_STYLES.get(status, 'cyan')}]{status}[/]"


def _counts_markup(job: Job) -> str:
    return "  ".join(
        f"[{style}]{label} {job[key]}[/]" for key, label, style in COUNT_COLUMNS if job[key]
    )


def _stdout() -> Console:
    """Rich on stdout. Into a pipe or a file, lines are never wrapped: grep, diff and logs
    get one row per job and whole messages."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = 1000
    return console


def _print_json(value: Any) -> None:
    print(json.dumps(value, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Undecodable):  # a payload Python cannot hold: say so
        return str(value)
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    if args.json:
        _print_json(data)
    else:
        print(text)


def _when(moment: datetime | None, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    return "" if moment is None else moment.astimezone().strftime(fmt)


def _jobs_table(jobs: list[Job]) -> Table:
    table = Table(box=box.SIMPLE_HEAD)
    for name in ("id", "kind", "status", "priority", "owner", "created"):
        table.add_column(
            name, justify="right" if name in ("id", "priority") else "left", no_wrap=True
        )
    table.add_column("message")
    for job in jobs:
        table.add_row(
            str(job["id"]),
            Text(job["kind"]),
            Text(job["status"], style=STATUS_STYLES.get(job["status"], "cyan")),
            str(job["priority"]),
            Text(job["owner"]),
            _when(job["created_at"], "%Y-%m-%d %H:%M"),
            # One row per job: the message gives way on a narrow terminal (show has it
            # whole); on the column, no_wrap would squeeze every other column instead.
            Text(job["message"] or "", no_wrap=True, overflow="ellipsis"),
        )
    return table


def _progress_line(job: Job) -> str:
    total, done = job["total"], _finished_tasks(job)
    line = f"{done}/{total} tasks finished"
    if total:
        line += f" ({100 * done // total}%)"
    if job["ended_at"] is not None:
        took = (job["ended_at"] - (job["started_at"] or job["created_at"])).total_seconds()
        line += f" in {took:.1f}s"
    return line


def _counts_table(job: Job) -> Table:
    table = Table(box=box.SIMPLE_HEAD)
    for _key, label, style in COUNT_COLUMNS:
        table.add_column(label, justify="right", header_style=style)
    table.add_column("total", justify="right")
    table.add_row(*(str(job[key]) for key, _label, _style in COUNT_COLUMNS), str(job["total"]))
    return table


def _print_job(args: argparse.Namespace, job: Job, problems: list[Job], *, brief: bool) -> None:
    """A job as show prints it; ``brief`` (an outcome after waiting) leaves out the
    fields the user just typed."""
    if args.json:
        _print_json({**job, "problems": problems})
        return
    out = _stdout()
    out.print(
        Text.assemble(
            (f"job {job['id']}", "bold"),
            "  ",
            job["kind"],
            "  ",
            (job["status"], f"bold {STATUS_STYLES.get(job['status'], 'cyan')}"),
        )
    )
    fields = Table.grid(padding=(0, 2))
    fields.add_column(style="dim")
    fields.add_column()
    if job["message"]:
        fields.add_row("message", Text(job["message"]))
    if not brief:
        fields.add_row("payload", Text(json.dumps(job["payload"], default=_json_default)))
        fields.add_row("priority", str(job["priority"]))
        fields.add_row("owner", Text(job["owner"]))
        for name in ("created", "started", "ended"):
            if job[f"{name}_at"] is not None:
                fields.add_row(name, _when(job[f"{name}_at"]))
    fields.add_row("progress", _progress_line(job))
    out.print(fields)
    out.print(_counts_table(job))
    if problems:
        out.print("latest failures and warnings:")
    for task in problems:
        # soft_wrap: a long message stays one line, whole, for grep and copy.
        out.print(
            Text.assemble(
                f"  task {task['seq']}  ",
                (task["status"], STATUS_STYLES.get(task["status"], "")),
                f"  attempt {task['attempts']}: ",
                task["message"] or "",
            ),
            soft_wrap=True,
        )
