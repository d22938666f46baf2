"""Connections, codecs and migration. The only module that knows how to reach PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import re
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg
import asyncpg.pool
import orjson

from herder.sql import schema_sql

SCHEMA_VERSION = 1
# Any fixed 64-bit key works; it only has to be the same on every host.
_MIGRATE_LOCK = 0x6865726465720001

if TYPE_CHECKING:
    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record]
    Pool: TypeAlias = asyncpg.Pool[asyncpg.Record]
    PoolConnection: TypeAlias = asyncpg.pool.PoolConnectionProxy[asyncpg.Record]
else:
    Connection = asyncpg.Connection
    Pool = asyncpg.Pool
    PoolConnection = asyncpg.pool.PoolConnectionProxy


def encode_json(value: Any) -> bytes:
    """JSON text as herder writes it (UTF-8); raises TypeError/ValueError for what is not
    JSON. orjson is ten times faster than the standard library here, which matters for a
    million task payloads; where the two disagree, the standard library's answer is kept.
    """
    try:
        text = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        # orjson refuses integers beyond 64 bits, which JSON allows: let the standard
        # library decide (it raises for what truly is not JSON).
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
    if b"null" in text:
        # orjson writes NaN and infinities as null; JSON has no such numbers.
        json.dumps(value, allow_nan=False)
    # orjson hands back its whole working buffer (4 KiB for a small document): a batch of
    # payloads kept for COPY would take 40 MB. A copy is sized to fit.
    return memoryview(text).tobytes()


def dumps(value: Any) -> str:
    """encode_json as a str, for text parameters and the json type."""
    return encode_json(value).decode()


# jsonb's binary wire format is a version byte (1) followed by the JSON text. Binary is
# what COPY needs, and it spares the server a text round trip. A bytes value is JSON text
# already encoded by encode_json (JSON has no bytes type of its own), sent as it is.
def _encode_jsonb(value: Any) -> bytes:
    return b"\x01" + (value if isinstance(value, bytes) else encode_json(value))


def decode_json(text: bytes | memoryview) -> Any:
    """Parse JSON as the standard library does, with orjson's speed where they agree.

    orjson reads integers beyond 64 bits as floats (losing digits) and refuses numbers
    beyond a double's range; such documents, or anything with a run of 19 digits, are
    left to the standard library.
    """
    if _LONG_NUMBER.search(text) is None:
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
    return json.loads(bytes(text))


_LONG_NUMBER = re.compile(rb"\d{19}")


def _decode_jsonb(data: bytes) -> Any:
    return decode_json(memoryview(data)[1:])


async def _init_connection(conn: Connection) -> None:
    await conn.set_type_codec("json", encoder=dumps, decoder=json.loads, schema="pg_catalog")
    await conn.set_type_codec(
        "jsonb",
        encoder=_encode_jsonb,
        decoder=_decode_jsonb,
        schema="pg_catalog",
        format="binary",
    )


async def connect(url: str, **kwargs: Any) -> Connection:
    conn: Connection = await asyncpg.connect(url, **kwargs)
    await _init_connection(conn)
    return conn


async def create_pool(
    url: str, *, min_size: int = 1, max_size: int = 8, reset_sessions: bool = True
) -> Pool:
    """A pool with herder's codecs.

    asyncpg resets a connection's session (RESET ALL, UNLISTEN, ...) each time it goes
    back to the pool: a round trip per query, which on a loaded machine costs as much as
    the query. herder's own queries leave no session state (SET LOCAL and function-level
    SET only), so its internal pool skips that reset (``reset_sessions=False``); the pool
    handed to kinds' code keeps it.
    """
    pool = await asyncpg.create_pool(
        url,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        reset=None if reset_sessions else _keep_session,
    )
    assert pool is not None
    return pool


async def _keep_session(conn: Connection) -> None:
    """Nothing to reset (asyncpg still rolls back an open transaction first)."""


async def migrate(conn: Connection) -> int:
    """Apply schema.sql; safe to repeat and to run from several hosts at once.

    A database already carrying this exact schema (same checksum) is left untouched, so a
    daemon running as herder_worker, which may not create anything, can still start.
    """
    sql = schema_sql()
    checksum = hashlib.sha256(sql.encode()).hexdigest()
    if await _applied_checksum(conn) == checksum:
        return SCHEMA_VERSION
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATE_LOCK)
        await conn.execute(sql)
        await conn.execute(
            "UPDATE herder.schema_version SET checksum = $1 WHERE version = $2",
            checksum,
            SCHEMA_VERSION,
        )
        version: int = await conn.fetchval("SELECT max(version) FROM herder.schema_version")
    return version


async def migrate_url(url: str) -> int:
    """Connect to ``url``, migrate it, disconnect."""
    conn = await connect(url)
    try:
        return await migrate(conn)
    finally:
        await conn.close()


async def _applied_checksum(conn: Connection) -> str | None:
    try:
        checksum: str | None = await conn.fetchval(
            "SELECT checksum FROM herder.schema_version WHERE version = $1", SCHEMA_VERSION
        )
    except (
        asyncpg.UndefinedTableError,
        asyncpg.InvalidSchemaNameError,
        asyncpg.UndefinedColumnError,
    ):
        return None
    return checksum
