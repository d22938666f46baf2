"""Where the benchmark's databases live: the embedded server (or ``DATABASE_URL``'s), and
one fresh database per phase so no phase measures another's leftovers."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg

from bench.sysstat import postmaster_pid
from herder import db

BENCH_DATA_DIR = Path(__file__).resolve().parent.parent / ".herder" / "bench-pgdata"
_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


class Server:
    """A PostgreSQL server the benchmark may create and drop databases on."""

    def __init__(self, url: str, handle: Any = None, *, embedded: bool) -> None:
        self.url = url
        self.embedded = embedded
        self._handle = handle
        self.created: list[str] = []
        self.postmaster: int | None = None

    @classmethod
    def provision(cls) -> Server:
        if url := os.environ.get("DATABASE_URL"):
            return cls(url, embedded=False)
        from herder import embedded

        url, handle = embedded.start(BENCH_DATA_DIR, keep_running=False)
        return cls(url, handle, embedded=True)

    def url_for(self, database: str) -> str:
        return with_database(self.url, database)

    async def find_postmaster(self) -> int | None:
        """The server's postmaster PID when it runs on this machine and we may read its
        data directory (to measure its CPU); None otherwise."""
        conn = await asyncpg.connect(self.url)
        try:
            data_dir = await conn.fetchval(
                "SELECT setting FROM pg_settings WHERE name = 'data_directory'"
            )
        except asyncpg.PostgresError:
            return None
        finally:
            await conn.close()
        pid = postmaster_pid(data_dir) if data_dir else None
        if pid is None or not await anyio.Path(f"/proc/{pid}").exists():
            return None
        self.postmaster = pid
        return pid

    async def version(self) -> str:
        conn = await asyncpg.connect(self.url)
        try:
            return str(await conn.fetchval("SHOW server_version"))
        finally:
            await conn.close()

    async def fresh(self, database: str) -> str:
        """Drop and create ``database``; return its URL."""
        assert _NAME.match(database), database
        conn = await asyncpg.connect(self.url)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
            await conn.execute(f"CREATE DATABASE {database}")
        finally:
            await conn.close()
        if database not in self.created:
            self.created.append(database)
        return self.url_for(database)

    async def fresh_herder(self, database: str) -> str:
        url = await self.fresh(database)
        await db.migrate_url(url)
        return url

    async def drop(self, database: str) -> None:
        conn = await asyncpg.connect(self.url)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        finally:
            await conn.close()
        if database in self.created:
            self.created.remove(database)

    async def drop_all(self) -> None:
        for database in list(self.created):
            await self.drop(database)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cleanup()
            self._handle = None
