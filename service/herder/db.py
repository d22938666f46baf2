"""Connections, codecs and migration. The only module that knows how to reach PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg
import asyncpg.pool
import orjson

from herder.sql import Upgrade, schema_sql, upgrades

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


class NotStorable(ValueError):
    """JSON that PostgreSQL's jsonb refuses: a NUL character or a lone surrogate."""


def encode_json(value: Any) -> bytes:
    """JSON text as herder writes it (UTF-8). Raises TypeError or ValueError for what is
    not JSON, and NotStorable (a ValueError) for JSON that jsonb cannot store.

    orjson is ten times faster than the standard library here, which matters for a
    million task payloads; where the two disagree, the standard library's answer is kept.
    """
    try:
        try:
            text = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
        except TypeError:
            # orjson refuses integers beyond 64 bits, which JSON allows, and strings with
            # lone surrogates: let the standard library decide (it raises for what truly
            # is not JSON, and UTF-8 cannot encode a lone surrogate).
            text = json.dumps(
                value, separators=(",", ":"), allow_nan=False, ensure_ascii=False
            ).encode()
        else:
            if b"null" in text:
                # orjson writes NaN and infinities as null; JSON has no such numbers.
                json.dumps(value, allow_nan=False)
            # orjson hands back its whole working buffer (4 KiB for a small document): a
            # batch of payloads kept for COPY would take 40 MB. A copy is sized to fit.
            text = memoryview(text).tobytes()
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except UnicodeEncodeError as exc:
        raise NotStorable(f"a string holds a lone surrogate ({exc.reason})") from None
    if b"u0000" in text and _NUL_ESCAPE.search(text):
        raise NotStorable("a string holds a NUL character (\\u0000)")
    return text


# \u0000 preceded by an even number of backslashes: an escaped NUL, not the text "\u0000".
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


def storable_text(text: str, limit: int) -> str:
    """``text`` as PostgreSQL's text type takes it: NUL characters and lone surrogates
    become U+FFFD, and text longer than ``limit`` characters is cut, with a marker."""
    if len(text) > limit:
        text = f"{text[:limit]}… [truncated {len(text) - limit} characters]"
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    try:
        text.encode()
    except UnicodeEncodeError:
        text = _SURROGATE.sub("\ufffd", text)
    return text


_SURROGATE = re.compile("[\ud800-\udfff]")


def dumps(value: Any) -> str:
    """encode_json as a str, for text parameters and the json type."""
    return encode_json(value).decode()


# jsonb's binary wire format is a version byte (1) followed by the JSON text. Binary is
# what COPY needs, and it spares the server a text round trip. A bytes value is JSON text
# already encoded by encode_json (JSON has no bytes type of its own), sent as it is.
def _encode_jsonb(value: Any) -> bytes:
    return b"\x01" + (value if isinstance(value, bytes) else encode_json(value))


@dataclass(frozen=True, slots=True)
class Undecodable:
    """What a jsonb value decodes to when Python cannot represent it (an integer of more
    than 4,300 digits, which jsonb keeps for ``1e5000``; nesting deeper than Python's
    recursion limit). The reader decides: a job payload fails its job, a task payload its
    task. Decoding never raises, so one value cannot fail a whole claim."""

    error: str

    def __str__(self) -> str:
        return f"<undecodable JSON: {self.error}>"


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
    try:
        return decode_json(memoryview(data)[1:])
    except (ValueError, RecursionError) as exc:
        return Undecodable(f"{type(exc).__name__}: {exc}"[:500])


def _decode_json_text(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        return Undecodable(f"{type(exc).__name__}: {exc}"[:500])


async def _init_connection(conn: Connection) -> None:
    await conn.set_type_codec("json", encoder=dumps, decoder=_decode_json_text, schema="pg_catalog")
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

    herder's own sessions also pin their search_path, whatever the role's settings say:
    its queries qualify every herder object, and a look-alike of a built-in
    (clock_timestamp, unnest) first on the role's path must not change what they compute.
    Kinds' code keeps the role's own path.
    """
    pool = await asyncpg.create_pool(
        url,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        reset=None if reset_sessions else _keep_session,
        server_settings=None if reset_sessions else {"search_path": "pg_catalog, pg_temp"},
    )
    assert pool is not None
    return pool


async def _keep_session(conn: Connection) -> None:
    """Nothing to reset (asyncpg still rolls back an open transaction first)."""


async def migrate(conn: Connection) -> int:
    """Bring the database to the current schema; safe to repeat and to run from several
    hosts at once (each in one transaction, one at a time under an advisory lock).

    A database an earlier version created first gets, in order, each upgrade step
    (sql/upgrades/) not yet recorded in herder.schema_version, recorded as it runs; then
    schema.sql, which states the current shape. A new database has nothing to upgrade: it
    gets schema.sql alone and every step is recorded as applied, so no step ever has to
    cope with an empty database.

    A database already carrying exactly these files (same checksum) is left untouched, so
    a daemon running as herder_worker, which may not create anything, can still start.
    """
    schema = schema_sql()
    steps = upgrades()
    checksum = _checksum(schema, steps)
    if await _applied_checksum(conn) == checksum:
        return SCHEMA_VERSION
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATE_LOCK)
        # Every version of herder created schema_version with its first tables.
        created_before = await conn.fetchval(
            "SELECT to_regclass('herder.schema_version') IS NOT NULL"
        )
        if created_before:
            await _upgrade(conn, steps)
        await conn.execute(schema)
        if not created_before:
            await _record(conn, [step.number for step in steps])
        await conn.execute(
            "UPDATE herder.schema_version SET checksum = $1 WHERE version = $2",
            checksum,
            SCHEMA_VERSION,
        )
        version: int = await conn.fetchval("SELECT max(version) FROM herder.schema_version")
    return version


async def _upgrade(conn: Connection, steps: list[Upgrade]) -> None:
    # Steps are recorded in this column, so it cannot arrive by a step of its own.
    await conn.execute(
        "ALTER TABLE herder.schema_version "
        "ADD COLUMN IF NOT EXISTS upgrades int[] NOT NULL DEFAULT '{}'"
    )
    applied = set(
        await conn.fetchval(
            "SELECT upgrades FROM herder.schema_version WHERE version = $1", SCHEMA_VERSION
        )
    )
    for step in steps:
        if step.number not in applied:
            try:
                await conn.execute(step.sql)
            except asyncpg.PostgresError as exc:
                exc.add_note(f"in upgrade step {step.name}")
                raise
            await _record(conn, [step.number])


async def _record(conn: Connection, numbers: list[int]) -> None:
    await conn.execute(
        "UPDATE herder.schema_version SET upgrades = upgrades || $1::int[] WHERE version = $2",
        numbers,
        SCHEMA_VERSION,
    )


def _checksum(schema: str, steps: list[Upgrade]) -> str:
    digest = hashlib.sha256()
    for step in steps:
        digest.update(f"{step.name}\0{step.sql}\0".encode())
    digest.update(schema.encode())
    return digest.hexdigest()


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
