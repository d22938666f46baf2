"""The command line's grammar: commands, flags, their value checks, and the environment.

Every flag has an environment variable ``HERDER_<FLAG>`` as its default (see
``add_option``), so a systemd unit or a container can configure herder without flags.
A value that does not parse, from a flag or a variable, is a usage error (exit 2) named
in one line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, NoReturn, TypeVar

from herder.address import parse_addr
from herder.states import JobStatus
from herder.store import CONTROL_ACTIONS

N = TypeVar("N", int, float)

#: Exit codes: 1 for "it did not work out", 2 for usage errors (as argparse), 130 for ^C.
EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130

CONTROL_HELP = {
    "cancel": "cancel a job: pending tasks at once, running ones within a second",
    "resume": "run the canceled tasks of a CANCELED job again",
    "retry": "run the failed tasks of a FAILURE job again",
    "restart": "prepare a finished job afresh",
    "verify": "let an UNVERIFIED job be prepared",
}


class CliError(Exception):
    """An expected failure: reported as one line, exit ``code``."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


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


# ---------------------------------------------------------------- value checks


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
    """An address the daemon can bind, checked by the parser its server uses."""
    try:
        parse_addr(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
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


# ---------------------------------------------------------------- the parser


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
    """The whole command line; ``command`` in the parsed arguments names the command."""
    env = os.environ if env is None else env
    parser = _Parser(prog="herder", description="PostgreSQL-backed jobs and tasks.")
    _add_global_options(parser, env, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=summary, description=summary)
        _add_global_options(sub, env, top=False)
        return sub

    command("migrate", "apply the schema (safe to repeat); print its version")

    _add_run_options(command("run", "migrate, then run the daemon in the foreground"), env)
    _add_submit_options(command("submit", "submit a job; print its id"), env)

    jobs = command("jobs", "list the latest jobs")
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

    prune = command("prune", "delete finished jobs older than the retention")
    add_option(
        prune,
        "--retention",
        env,
        type=_duration,
        default=_duration("30d"),
        help="age of finished jobs to delete: 90s, 15m, 12h, 30d (default 30d)",
    )

    show = command("show", "a job's fields, task counts and latest problems")
    show.add_argument("job_id", metavar="JOB_ID", type=_job_id)
    add_option(
        show,
        "--follow",
        env,
        action="store_true",
        help="show progress until the job settles; exit as submit --wait",
    )

    for action in CONTROL_ACTIONS:
        control = command(action, CONTROL_HELP[action])
        control.add_argument("job_id", metavar="JOB_ID", type=_job_id)

    command("fleet", "the live daemons: name, host, pid, kinds, started, last seen")

    command("demo", "run a demo job in an in-process daemon and show it")
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
        "--name",
        default=None,
        metavar="NAME",
        help="this daemon's name in tasks.worker, herder.daemons, logs and /healthz; one "
        "live process per name (default HOST:PID:RANDOM)",
    )
    opt(
        "--health-addr",
        type=_host_port,
        default="127.0.0.1:9464",
        metavar="HOST:PORT",
        help="address of /healthz and /metrics; :PORT for every interface (default %(default)s)",
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
        "--no-fair-sharing",
        action="store_true",
        help="claim jobs strictly in priority and job order (to measure what fairness costs)",
    )
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
