"""The command line as users run it: ``python -m herder`` in a subprocess, against the
test's own database; a daemon runs in-process wherever a job must actually run."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from herder import db
from herder.address import parse_addr
from herder.cli import build_parser, env_var, main
from herder.cli.commands import COMMANDS
from herder.states import JOB_FINISHED
from herder.store import Store
from tests.support import job_row, running_daemon, wait_finished, wait_for

UNREACHABLE = "postgresql://postgres@127.0.0.1:1/x"


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def _env(url: str | None, **extra: str) -> dict[str, str]:
    """This process's environment without any herder setting, plus ``extra``."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("HERDER_") and k != "DATABASE_URL"
    }
    if url is not None:
        env["DATABASE_URL"] = url
    return {**env, **extra}


async def herder(url: str | None, *args: str, **env: str) -> Result:
    with anyio.fail_after(60):
        done = await anyio.run_process(
            [sys.executable, "-m", "herder", *args], env=_env(url, **env), check=False
        )
    return Result(done.returncode, done.stdout.decode(), done.stderr.decode())


def assert_one_line_error(result: Result, *fragments: str) -> None:
    assert result.code != 0
    assert "Traceback" not in result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("error: "), result.err
    for fragment in fragments:
        assert fragment in lines[0]


async def _set_status(conn: db.Connection, job_id: int, status: str) -> None:
    # Only the status matters to the CLI; the engine's transitions are tested elsewhere.
    await conn.execute("UPDATE herder.jobs SET status = $2 WHERE id = $1", job_id, status)


# ---------------------------------------------------------------- migrate and submit


async def test_migrate_is_idempotent(db_url: str, conn: db.Connection, store: Store) -> None:
    version = await conn.fetchval("SELECT max(version) FROM herder.schema_version")
    job_id = await store.submit("synthetic", {"tasks": 1})

    first = await herder(db_url, "migrate")
    second = await herder(db_url, "--json", "migrate")

    assert (first.code, first.out.strip()) == (0, f"schema version {version}")
    assert (second.code, second.json()) == (0, {"schema_version": version})
    assert (await job_row(conn, job_id))["status"] == "PREPARING"


async def test_submit_prints_the_id_of_a_new_row(db_url: str, conn: db.Connection) -> None:
    result = await herder(db_url, "submit", "synthetic", '{"tasks": 3}', "--priority", "5")

    assert result.code == 0, result.err
    job = await job_row(conn, int(result.out))
    assert (job["kind"], job["payload"], job["priority"], job["status"]) == (
        "synthetic",
        {"tasks": 3},
        5,
        "PREPARING",
    )


async def test_submit_json_unverified_with_default_payload(
    db_url: str, conn: db.Connection
) -> None:
    result = await herder(db_url, "submit", "synthetic", "--unverified", "--json")

    assert result.code == 0, result.err
    job = await job_row(conn, result.json()["id"])
    assert (job["status"], job["payload"]) == ("UNVERIFIED", {})


async def test_submit_wait_exits_0_on_success(db_url: str) -> None:
    async with running_daemon(db_url):
        result = await herder(db_url, "submit", "synthetic", '{"tasks": 20}', "--wait")

    assert result.code == 0, result.err
    assert int(result.out.splitlines()[0]) > 0  # the id comes first
    assert "SUCCESS" in result.out
    assert "20/20 tasks finished" in result.out


async def test_submit_wait_exits_1_on_a_failing_job(db_url: str) -> None:
    async with running_daemon(db_url):
        result = await herder(db_url, "submit", "synthetic", '{"tasks": 3, "fail": [1]}', "--wait")

    assert result.code == 1
    assert "FAILURE" in result.out
    assert "synthetic failure of task 1" in result.out


async def test_submit_wait_json_prints_only_the_final_job(db_url: str) -> None:
    async with running_daemon(db_url):
        result = await herder(
            db_url, "--json", "submit", "synthetic", '{"tasks": 4, "warn": [2]}', "--wait"
        )

    assert result.code == 0, result.err
    job = result.json()
    assert (job["status"], job["total"], job["success"], job["warning"]) == ("WARNING", 4, 3, 1)
    assert job["problems"][0]["message"] == "synthetic warning for task 2"
    assert result.err == ""  # no progress bar


# ---------------------------------------------------------------- jobs and show


async def test_jobs_lists_and_filters(db_url: str, store: Store) -> None:
    first = await store.submit("synthetic", {"tasks": 1})
    second = await store.submit("mine", {}, unverified=True)

    table = await herder(db_url, "jobs")
    listed = await herder(db_url, "jobs", "--json")
    filtered = await herder(db_url, "--json", "jobs", "--status", "unverified", "--limit", "5")

    assert table.code == 0, table.err
    assert "synthetic" in table.out
    assert "UNVERIFIED" in table.out
    assert [job["id"] for job in listed.json()] == [second, first]
    datetime.fromisoformat(listed.json()[0]["created_at"])
    assert [job["id"] for job in filtered.json()] == [second]


async def test_jobs_filters_by_kind_owner_and_age(
    db_url: str, conn: db.Connection, store: Store
) -> None:
    old = await store.submit("synthetic", {"tasks": 1})
    await conn.execute(
        "UPDATE herder.jobs SET created_at = now() - interval '3 days' WHERE id = $1", old
    )
    other_kind = await store.submit("mine", {})
    someone_elses = await store.submit("synthetic", {})
    await conn.execute("UPDATE herder.jobs SET owner = 'carol' WHERE id = $1", someone_elses)

    async def ids(*args: str) -> list[int]:
        result = await herder(db_url, "jobs", "--json", *args)
        assert result.code == 0, result.err
        return [job["id"] for job in result.json()]

    assert await ids("--kind", "synthetic") == [someone_elses, old]
    assert await ids("--owner", "carol") == [someone_elses]
    assert await ids("--since", "1d") == [someone_elses, other_kind]
    assert await ids("--since", "2000-01-01", "--kind", "mine") == [other_kind]
    assert_one_line_error(await herder(db_url, "jobs", "--since", "yesterday"), "duration")


async def test_show_lists_the_failure_message(
    db_url: str, conn: db.Connection, store: Store
) -> None:
    job_id = await store.submit("synthetic", {"tasks": 3, "fail": [1]})
    async with running_daemon(db_url):
        await wait_finished(conn, job_id)

    text = await herder(db_url, "show", str(job_id))
    shown = await herder(db_url, "show", str(job_id), "--json")

    assert text.code == 0, text.err
    assert "FAILURE" in text.out
    assert "3/3 tasks finished" in text.out
    assert "synthetic failure of task 1" in text.out
    job = shown.json()
    assert (job["status"], job["success"], job["failure"]) == ("FAILURE", 2, 1)
    assert job["payload"] == {"tasks": 3, "fail": [1]}
    assert job["problems"][0]["message"] == "synthetic failure of task 1"
    datetime.fromisoformat(job["ended_at"])


async def test_show_follow_returns_once_the_job_settles(db_url: str, store: Store) -> None:
    job_id = await store.submit("synthetic", {"tasks": 50, "task_ms": 1})
    async with running_daemon(db_url):
        result = await herder(db_url, "show", str(job_id), "--follow")

    assert result.code == 0, result.err
    assert "SUCCESS" in result.out
    assert "50/50 tasks finished" in result.out


async def test_show_of_a_missing_job(db_url: str) -> None:
    result = await herder(db_url, "show", "424242")

    assert result.code == 1
    assert_one_line_error(result, "job 424242 does not exist")


async def test_show_of_a_job_whose_payload_python_cannot_hold(
    db_url: str, conn: db.Connection
) -> None:
    """jsonb keeps 1e5000 as a 5,001-digit integer: show says so instead of failing."""
    job_id = await conn.fetchval(
        "INSERT INTO herder.jobs (kind, payload) VALUES ('synthetic', '{\"tasks\": 1e5000}') "
        "RETURNING id"
    )
    for args in (["show", str(job_id)], ["show", str(job_id), "--json"]):
        result = await herder(db_url, *args)
        assert result.code == 0, result.err
        assert "undecodable JSON" in result.out
    assert (await herder(db_url, "jobs", "--json")).code == 0


# ---------------------------------------------------------------- control

CONTROL_CASES = [
    # action, a status it applies to, the status it leads to, a status it does not apply to
    ("cancel", "PENDING", "CANCELING", "SUCCESS"),
    ("resume", "CANCELED", "PREPARING", "FAILURE"),
    ("retry", "FAILURE", "PREPARING", "SUCCESS"),
    ("restart", "SUCCESS", "PREPARING", "IN_PROGRESS"),
    ("verify", "UNVERIFIED", "PREPARING", "CANCELED"),
]


@pytest.mark.parametrize(("action", "applies_to", "leads_to", "refused_in"), CONTROL_CASES)
async def test_control_commands(
    db_url: str,
    conn: db.Connection,
    store: Store,
    action: str,
    applies_to: str,
    leads_to: str,
    refused_in: str,
) -> None:
    job_id = await store.submit("synthetic", {"tasks": 1})
    await _set_status(conn, job_id, applies_to)

    applied = await herder(db_url, action, str(job_id))
    assert applied.code == 0, applied.err
    assert f"job {job_id}: {action} applied" in applied.out
    assert (await job_row(conn, job_id))["status"] == leads_to

    await _set_status(conn, job_id, refused_in)
    refused = await herder(db_url, action, str(job_id))
    assert refused.code == 1
    assert_one_line_error(refused, f"job {job_id} is {refused_in}; {action} does not apply")
    assert (await job_row(conn, job_id))["status"] == refused_in

    missing = await herder(db_url, action, "424242")
    assert missing.code == 1
    assert_one_line_error(missing, "job 424242 does not exist")


async def test_control_json(db_url: str, store: Store) -> None:
    job_id = await store.submit("synthetic", {"tasks": 1})

    first = await herder(db_url, "--json", "cancel", str(job_id))
    again = await herder(db_url, "cancel", str(job_id), "--json")

    assert first.code == 0, first.err
    assert first.json() == {
        "id": job_id,
        "action": "cancel",
        "applied": True,
        "status": "CANCELING",
    }
    assert again.code == 1
    assert again.json() == {
        "id": job_id,
        "action": "cancel",
        "applied": False,
        "status": "CANCELING",
    }


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "args",
    [
        ["submit", "synthetic", "{not json"],
        ["show", "abc"],
        ["cancel", "1.5"],
        ["retry"],
        ["jobs", "--status", "DONE"],
        ["run", "--concurrency", "0"],
        ["frobnicate"],
    ],
)
async def test_bad_input_is_one_line_and_exit_2(args: list[str]) -> None:
    # Parsed before any connection: the unreachable URL is never tried.
    result = await herder(UNREACHABLE, *args)

    assert result.code == 2
    assert_one_line_error(result)


@pytest.mark.parametrize(
    "args", [["migrate"], ["jobs"], ["submit", "synthetic"], ["show", "1"], ["cancel", "1"]]
)
async def test_unreachable_database_is_one_line(args: list[str]) -> None:
    result = await herder(UNREACHABLE, *args)

    assert result.code == 1
    assert_one_line_error(result, "cannot reach the database")


async def test_no_database_is_one_line() -> None:
    result = await herder(None, "jobs")

    assert result.code == 2
    assert_one_line_error(result, "DATABASE_URL")


# ---------------------------------------------------------------- flags and environment


def test_every_command_has_a_handler() -> None:
    subparsers = next(
        action
        for action in build_parser({})._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    assert set(subparsers.choices) == set(COMMANDS)


def test_env_var_names() -> None:
    assert env_var("--poll-interval") == "HERDER_POLL_INTERVAL"
    assert env_var("--no-listen") == "HERDER_NO_LISTEN"


def test_run_defaults() -> None:
    args = build_parser({}).parse_args(["run"])

    assert (args.concurrency, args.apps, args.health_addr, args.prefetch, args.name) == (
        10,
        [],
        "127.0.0.1:9464",
        None,
        None,
    )
    assert (args.lease_seconds, args.poll_interval, args.shutdown_timeout) == (30.0, 1.0, 30.0)
    assert (args.no_listen, args.json, args.database_url) == (False, False, None)


def test_every_flag_defaults_to_its_env_var() -> None:
    env = {
        "DATABASE_URL": "postgresql://db/herder",
        "HERDER_JSON": "yes",
        "HERDER_CONCURRENCY": "3",
        "HERDER_APP": "mod1, mod2",
        "HERDER_HEALTH_ADDR": "0.0.0.0:9000",
        "HERDER_LEASE_SECONDS": "12",
        "HERDER_POLL_INTERVAL": "0.25",
        "HERDER_SHUTDOWN_TIMEOUT": "0",
        "HERDER_NO_LISTEN": "1",
        "HERDER_PREFETCH": "7",
        "HERDER_NAME": "web-1",
    }
    args = build_parser(env).parse_args(["run"])

    assert args.database_url == "postgresql://db/herder"
    assert args.json is True
    assert (args.concurrency, args.apps, args.health_addr) == (3, ["mod1", "mod2"], "0.0.0.0:9000")
    assert (args.lease_seconds, args.poll_interval, args.shutdown_timeout) == (12.0, 0.25, 0.0)
    assert (args.no_listen, args.prefetch, args.name) == (True, 7, "web-1")
    submit = build_parser({"HERDER_PRIORITY": "-4"}).parse_args(["submit", "k"])
    assert (submit.priority, submit.payload) == (-4, {})


def test_the_command_line_beats_the_environment() -> None:
    env = {"HERDER_CONCURRENCY": "3", "HERDER_APP": "mod1,mod2", "DATABASE_URL": "env"}
    args = build_parser(env).parse_args(
        ["run", "--concurrency", "7", "--app", "a", "--app", "b", "--database-url", "flag"]
    )

    assert (args.concurrency, args.apps, args.database_url) == (7, ["a", "b"], "flag")


def test_global_options_go_before_or_after_the_command() -> None:
    parser = build_parser({})

    assert parser.parse_args(["--json", "jobs"]).json is True
    assert parser.parse_args(["jobs", "--json"]).json is True
    assert parser.parse_args(["jobs"]).json is False
    assert parser.parse_args(["--database-url", "a", "jobs"]).database_url == "a"
    assert parser.parse_args(["jobs", "--database-url", "b"]).database_url == "b"


@pytest.mark.parametrize(
    ("addr", "host", "port"),
    [
        (":9464", None, 9464),
        ("0.0.0.0:9464", "0.0.0.0", 9464),
        ("localhost:9000", "localhost", 9000),
        ("[::1]:9464", "::1", 9464),
        ("127.0.0.1:0", "127.0.0.1", 0),
    ],
)
def test_health_addr_forms(addr: str, host: str | None, port: int) -> None:
    # The flag and the variable take what the health server binds, and nothing else.
    assert build_parser({}).parse_args(["run", "--health-addr", addr]).health_addr == addr
    assert build_parser({"HERDER_HEALTH_ADDR": addr}).parse_args(["run"]).health_addr == addr
    assert parse_addr(addr) == (host, port)


@pytest.mark.parametrize("addr", ["nowhere", "9464", "host:", "host:65536", "host:-1", "host:9x"])
def test_a_bad_health_addr_is_a_usage_error(capsys: pytest.CaptureFixture[str], addr: str) -> None:
    assert main(["run", "--health-addr", addr]) == 2
    assert capsys.readouterr().err == (
        f"error: argument --health-addr: expected HOST:PORT, got {addr!r} "
        "(see 'herder run --help')\n"
    )
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        parse_addr(addr)


@pytest.mark.parametrize(
    ("name", "value", "named"),
    [("HERDER_CONCURRENCY", "many", "--concurrency"), ("HERDER_NO_LISTEN", "maybe", "HERDER_")],
)
def test_a_bad_env_value_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    name: str,
    value: str,
    named: str,
) -> None:
    monkeypatch.setenv(name, value)

    assert main(["run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert named in err
    assert len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- demo


async def test_demo_runs_its_job_in_process_and_shows_it(db_url: str, conn: db.Connection) -> None:
    result = await herder(db_url, "demo")
    assert result.code == 0, result.err  # WARNING: one task warns, by design
    assert result.out.startswith("demo job 1: synthetic {")
    assert "WARNING" in result.out
    assert "synthetic warning for task 7" in result.out
    assert "look again with: herder --database-url" in result.out
    job = await job_row(conn, 1)
    assert (job["status"], job["message"]) == ("WARNING", "1 of 2000 tasks with warnings")


# ---------------------------------------------------------------- run


async def test_run_serves_until_sigterm(db_url: str, conn: db.Connection, tmp_path: Path) -> None:
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    command = [sys.executable, "-m", "herder", "run", "--health-addr", "127.0.0.1:0"]
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = await anyio.open_process(
            [*command, "--poll-interval", "0.2"],
            env=_env(db_url, HERDER_CONCURRENCY="3"),
            stdout=stdout,
            stderr=stderr,
        )
        try:
            job_id = await conn.fetchval(
                "INSERT INTO herder.jobs (kind, payload) "
                "VALUES ('synthetic', '{\"tasks\": 10}') RETURNING id"
            )

            async def settled() -> dict[str, Any] | None:
                if process.returncode is not None:
                    raise AssertionError(f"herder run exited early: {err.read_text()}")
                job = await job_row(conn, job_id)
                return job if job["status"] in JOB_FINISHED else None

            job = await wait_for(settled, timeout=30, what=f"job {job_id} to settle")
            assert job["status"] == "SUCCESS"
            process.send_signal(signal.SIGTERM)
            with anyio.fail_after(30):
                code = await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()

    assert code == 0, err.read_text()
    assert "INSERT INTO herder.jobs (kind, payload)" in err.read_text()
    events = [json.loads(line) for line in out.read_text().splitlines() if line.startswith("{")]
    serving = next(event for event in events if event["event"] == "serving")
    assert serving["concurrency"] == 3  # from HERDER_CONCURRENCY


async def test_run_name_reaches_the_daemon(
    db_url: str, conn: db.Connection, tmp_path: Path
) -> None:
    name = "cli-named-daemon"
    out = tmp_path / "stdout"
    # ":0": every interface, as the health server takes it.
    command = [sys.executable, "-m", "herder", "run", "--name", name, "--health-addr", ":0"]
    with out.open("wb") as stdout:
        process = await anyio.open_process(
            [*command, "--poll-interval", "0.2", "--shutdown-timeout", "0"],
            env=_env(db_url),
            stdout=stdout,
            stderr=stdout,
        )
        try:
            job_id = await conn.fetchval(
                "INSERT INTO herder.jobs (kind, payload) "
                "VALUES ('synthetic', '{\"tasks\": 1, \"task_ms\": 600000}') RETURNING id"
            )

            async def claimed() -> str | None:
                if process.returncode is not None:
                    raise AssertionError(f"herder run exited early: {out.read_text()}")
                worker: str | None = await conn.fetchval(
                    "SELECT worker FROM herder.tasks WHERE job_id = $1 AND status = 'IN_PROGRESS'",
                    job_id,
                )
                return worker

            assert await wait_for(claimed, timeout=30, what="the task to start") == name
            events = [json.loads(line) for line in out.read_text().splitlines() if line[:1] == "{"]
            serving = next(event for event in events if event["event"] == "serving")
            port = serving["health"].rpartition(":")[2]
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
                session.get(f"http://127.0.0.1:{port}/healthz") as response,
            ):
                health = await response.json()
            process.send_signal(signal.SIGTERM)
            with anyio.fail_after(30):
                code = await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()

    assert code == 0, out.read_text()
    assert serving["name"] == health["name"] == name
