"""PostgreSQL for the tests: TEST_DATABASE_URL if set, else a testcontainers container
when a Docker engine answers, else an embedded server (pgserver). Each test gets a fresh,
migrated database cloned from a template, so tests never see each other's jobs."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from herder import db, logs
from herder.kinds import Kind, TaskContext, unregister
from herder.store import Store
from tests.private_pg import PrivatePostgres
from tests.support import DaemonProcess, Login, as_role, cloned_database, with_database

# One template per test run: two runs sharing a server (TEST_DATABASE_URL) must not
# drop each other's template mid-run.
TEMPLATE = f"herder_test_template_{os.getpid()}"

# Property tests draw new examples on every developer run; CI (which sets CI) replays the
# same ones each time, so that a submission lands or not on its own merits.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
_counter = itertools.count()


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return (
            subprocess.run(
                ["docker", "info"], capture_output=True, timeout=10, check=False
            ).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """A PostgreSQL superuser URL to the maintenance database of the test server."""
    logs.configure("WARNING", json=False)
    if url := os.environ.get("TEST_DATABASE_URL"):
        yield url
    elif _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as container:
            yield container.get_connection_url()
    else:
        from pgserver.postgres_server import get_server

        data_dir = tempfile.mkdtemp(prefix="herder-pg-")
        server = get_server(data_dir, cleanup_mode="delete")
        try:
            yield server.get_uri()
        finally:
            server.cleanup()


@pytest.fixture(scope="session")
async def template_url(server_url: str) -> AsyncIterator[str]:
    admin = await db.connect(server_url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE)")
        await admin.execute(f"CREATE DATABASE {TEMPLATE}")
    finally:
        await admin.close()
    url = with_database(server_url, TEMPLATE)
    await db.migrate_url(url)
    yield url
    admin = await db.connect(server_url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE)")
    finally:
        await admin.close()


@pytest.fixture
async def db_url(server_url: str, template_url: str) -> AsyncIterator[str]:
    """A fresh database with the herder schema, dropped after the test."""
    name = f"herder_test_{os.getpid()}_{next(_counter)}"
    async with cloned_database(server_url, name, TEMPLATE) as url:
        yield url


@pytest.fixture
async def conn(db_url: str) -> AsyncIterator[db.Connection]:
    connection = await db.connect(db_url)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    pool = await db.create_pool(db_url, min_size=1, max_size=4)
    try:
        yield Store(pool)
    finally:
        await pool.close()


@pytest.fixture
async def login(db_url: str, conn: db.Connection) -> AsyncIterator[Login]:
    """Create login roles (cluster-wide, uniquely named) granted the given roles; connect
    as them. Dropped afterwards, with whatever they own in the test's database."""
    made: list[tuple[str, db.Connection]] = []

    async def make(*grants: str) -> tuple[str, db.Connection]:
        name = f"login_{os.getpid()}_{next(_counter)}"
        await conn.execute(f"CREATE ROLE {name} LOGIN PASSWORD 'secret'")
        for grant in grants:
            await conn.execute(f"GRANT {grant} TO {name}")
        connection = await db.connect(as_role(db_url, name))
        made.append((name, connection))
        return name, connection

    yield make
    for name, connection in made:
        await connection.close()
        await conn.execute(f"DROP OWNED BY {name}")
        await conn.execute(f"DROP ROLE {name}")


@pytest.fixture
def make_kind() -> Iterator[Callable[..., Kind]]:
    """Declare throwaway kinds for one test; they are forgotten afterwards."""
    made: list[str] = []

    def make(name: str, **options: Any) -> Kind:
        made.append(name)
        kind = Kind(name, **options)
        # A kind without process stops every daemon at start (a configuration error):
        # tests that care declare their own, which replaces this one.
        kind.process(_no_op)
        return kind

    yield make
    for name in made:
        unregister(name)


async def _no_op(task: TaskContext) -> None:
    return None


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PrivatePostgres]:
    """A server of this module's own, which its tests may stop, restart and crash."""
    server = PrivatePostgres()
    server.start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
async def private_db_url(private_pg: PrivatePostgres) -> AsyncIterator[str]:
    """A fresh, migrated database on the private server."""
    name = f"herder_private_{next(_counter)}"
    admin = await db.connect(private_pg.url)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    url = with_database(private_pg.url, name)
    await db.migrate_url(url)
    yield url


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Start ``herder run`` processes; any still alive at the end are killed."""
    started: list[DaemonProcess] = []

    def start(url: str, *args: str) -> DaemonProcess:
        process = DaemonProcess(url, tmp_path, *args)
        started.append(process)
        return process

    yield start
    for process in started:
        process.close()
