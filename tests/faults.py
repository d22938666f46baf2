"""Fault injection for the daemon's database access.

``FaultyPool`` stands in for ``Store.pool``. Every query herder runs is one of the named
queries of ``herder.sql.QUERIES`` and is sent as exactly that text, so the proxy knows
each call by name (a reverse lookup of the text). For a chosen name it makes the Nth
call fail in one of three ways (``Mode``):

- ``LOST_BEFORE`` (a): the connection is gone before the query is sent; nothing ran.
- ``LOST_AFTER`` (b): the query ran and committed, then the connection died and the
  reply was lost. Inside a transaction the error comes when the transaction commits
  (the reply to COMMIT is what was lost), so the whole transaction did commit.
- ``REFUSED`` (c): PostgreSQL refused the statement with an error that is not transient
  (``DataError``); nothing ran.

By default only *effective* calls count: calls that return a row, or change one (an
``UPDATE 0`` or an empty result does not count). For (a) and (c) the proxy finds out by
running the call once in a transaction (a savepoint inside one) that it rolls back, so
the fault hits a call that mattered, and the daemon sees exactly what it would have
seen had the connection failed. Connections handed out by ``acquire()`` are wrapped too,
so multi-statement transactions are covered.

The daemon builds its pool inside ``Daemon.run``; ``faulty_daemon`` starts a daemon and
then swaps ``daemon.store.pool`` for the proxy (every loop reads ``store.pool`` on each
call, so from then on every query goes through it), and watches the daemon: a daemon
that dies is recorded in ``Watch.died`` instead of tearing the test down.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, cast

import anyio
import anyio.abc
import asyncpg
import structlog

from herder import db
from herder.daemon import Daemon, DaemonConfig
from herder.sql import QUERIES

log = structlog.get_logger("tests.faults")

INJECTED = "injected"


class Mode(enum.Enum):
    LOST_BEFORE = "a-lost-before"
    LOST_AFTER = "b-lost-after"
    REFUSED = "c-refused"


def query_names(queries: Mapping[str, str] = QUERIES) -> dict[str, str]:
    """SQL text -> query name. Two names with one text would make a call ambiguous."""
    names: dict[str, str] = {}
    for name, sql in queries.items():
        if sql in names:
            raise ValueError(f"queries {names[sql]!r} and {name!r} have the same text")
        names[sql] = name
    return names


@dataclass
class Fault:
    query: str
    mode: Mode
    #: The nth counted call of ``query`` fails first ...
    nth: int = 1
    #: ... and this many counted calls in a row fail.
    times: int = 1
    #: Count only calls that return or change something (see the module docstring).
    effective_only: bool = True
    counted: int = 0
    fired: int = 0

    @property
    def exhausted(self) -> bool:
        return self.fired >= self.times


@dataclass(frozen=True)
class Fired:
    query: str
    mode: Mode
    #: The call's number among all calls of this query through the proxy (1-based).
    call: int
    args: tuple[Any, ...]
    #: LOST_AFTER: what the lost reply carried. Otherwise what the rolled-back dry run
    #: returned (None when effective_only is off).
    result: Any
    in_transaction: bool

    def __str__(self) -> str:
        where = " (in a transaction)" if self.in_transaction else ""
        return f"{self.mode.value} on {self.query} call {self.call}{where}"


def error_for(mode: Mode, query: str) -> Exception:
    if mode is Mode.REFUSED:
        return asyncpg.exceptions.DataError(f"{INJECTED}: {query} refused")
    when = "before sending" if mode is Mode.LOST_BEFORE else "after it ran (reply lost)"
    return asyncpg.exceptions.ConnectionDoesNotExistError(
        f"{INJECTED}: connection lost {when}: {query}"
    )


def effective(method: str, result: Any) -> bool:
    """Did a call return or change something?"""
    if method == "fetch":
        return bool(result)
    if method == "execute":
        # "UPDATE 0", "DELETE 0", "SELECT 0", "INSERT 0 0": nothing; "SET", "UPDATE 3": something.
        return not (isinstance(result, str) and result.split()[-1] == "0")
    if method == "fetchval":
        # No row, NULL, or false (a lock not taken): nothing. (0 may be a real answer.)
        return result is not None and result is not False
    return result is not None


Call = Callable[[], Awaitable[Any]]


class Injector:
    """The faults and the record of calls, shared by a pool and its connections."""

    def __init__(self, faults: Iterable[Fault] = (), names: Mapping[str, str] | None = None):
        self.names = query_names() if names is None else dict(names)
        self.faults: list[Fault] = list(faults)
        #: Calls by query name: begun, and returned or raised.
        self.calls: Counter[str] = Counter()
        self.completed: Counter[str] = Counter()
        self.fired: list[Fired] = []
        #: Set when the first fault fires (tests wait on it instead of sleeping).
        self.fired_event = anyio.Event()

    def arm(self, *faults: Fault) -> None:
        self.faults.extend(faults)

    def disarm(self) -> None:
        self.faults.clear()

    def name_of(self, sql: str) -> str | None:
        return self.names.get(sql)

    def _armed(self, name: str) -> Fault | None:
        for fault in self.faults:
            if fault.query == name and not fault.exhausted:
                return fault
        return None

    def _fire(self, fault: Fault, fired: Fired) -> None:
        fault.fired += 1
        self.fired.append(fired)
        self.fired_event.set()
        log.warning("fault injected", fault=str(fired))

    async def call(
        self,
        method: str,
        sql: str,
        args: tuple[Any, ...],
        real: Call,
        dry: Call,
        *,
        in_transaction: bool,
        lost_on_commit: Callable[[Exception], None] | None,
    ) -> Any:
        name = self.name_of(sql)
        if name is None:
            return await real()
        self.calls[name] += 1
        try:
            return await self._call(name, method, args, real, dry, in_transaction, lost_on_commit)
        finally:
            self.completed[name] += 1

    async def _call(
        self,
        name: str,
        method: str,
        args: tuple[Any, ...],
        real: Call,
        dry: Call,
        in_transaction: bool,
        lost_on_commit: Callable[[Exception], None] | None,
    ) -> Any:
        number = self.calls[name]
        fault = self._armed(name)
        if fault is None:
            return await real()
        if fault.mode is Mode.LOST_AFTER:
            result = await real()
            if fault.effective_only and not effective(method, result):
                return result
            fault.counted += 1
            if fault.counted < fault.nth:
                return result
            self._fire(fault, Fired(name, fault.mode, number, args, result, in_transaction))
            error = error_for(fault.mode, name)
            if lost_on_commit is not None:
                lost_on_commit(error)  # raised once the transaction has committed
                return result
            raise error
        seen: Any = None
        if fault.effective_only:
            try:
                seen = await dry()
            except Exception:
                return await real()  # let the real call fail as it does
            if not effective(method, seen):
                return await real()
        fault.counted += 1
        if fault.counted < fault.nth:
            return await real()
        self._fire(fault, Fired(name, fault.mode, number, args, seen, in_transaction))
        raise error_for(fault.mode, name)


class _Queries:
    """The query methods of asyncpg's pool and connection, each through ``_call``."""

    async def _call(
        self, method: str, query: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        raise NotImplementedError

    async def fetch(self, query: str, *args: Any, **kwargs: Any) -> list[asyncpg.Record]:
        result: list[asyncpg.Record] = await self._call("fetch", query, args, kwargs)
        return result

    async def fetchrow(self, query: str, *args: Any, **kwargs: Any) -> asyncpg.Record | None:
        result: asyncpg.Record | None = await self._call("fetchrow", query, args, kwargs)
        return result

    async def fetchval(self, query: str, *args: Any, **kwargs: Any) -> Any:
        return await self._call("fetchval", query, args, kwargs)

    async def execute(self, query: str, *args: Any, **kwargs: Any) -> str:
        result: str = await self._call("execute", query, args, kwargs)
        return result


class FaultyPool(_Queries):
    """A stand-in for an asyncpg pool that fails chosen named queries."""

    def __init__(
        self,
        pool: db.Pool,
        faults: Iterable[Fault] = (),
        *,
        names: Mapping[str, str] | None = None,
    ) -> None:
        self.pool = pool
        self.injector = Injector(faults, names)

    # What tests use.
    def arm(self, *faults: Fault) -> None:
        self.injector.arm(*faults)

    @property
    def fired(self) -> list[Fired]:
        return self.injector.fired

    @property
    def calls(self) -> Counter[str]:
        return self.injector.calls

    def acquire(self, **kwargs: Any) -> _Acquire:
        return _Acquire(self, kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)

    async def _call(
        self, method: str, query: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        async def real() -> Any:
            return await getattr(self.pool, method)(query, *args, **kwargs)

        async def dry() -> Any:
            async with self.pool.acquire() as conn:
                return await _rolled_back(conn, method, query, args, kwargs)

        return await self.injector.call(
            method, query, args, real, dry, in_transaction=False, lost_on_commit=None
        )


class _Acquire:
    def __init__(self, pool: FaultyPool, kwargs: dict[str, Any]) -> None:
        self._pool = pool
        self._context = pool.pool.acquire(**kwargs)

    async def __aenter__(self) -> FaultyConnection:
        conn = await self._context.__aenter__()
        return FaultyConnection(conn, self._pool.injector)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._context.__aexit__(exc_type, exc, tb)


class FaultyConnection(_Queries):
    """A pooled connection whose named queries may fail; its transactions too."""

    def __init__(self, conn: db.PoolConnection, injector: Injector) -> None:
        self.conn = conn
        self.injector = injector
        self._depth = 0
        self._lost: Exception | None = None

    def transaction(self, **kwargs: Any) -> FaultyTransaction:
        return FaultyTransaction(self, self.conn.transaction(**kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)

    async def _call(
        self, method: str, query: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        async def real() -> Any:
            return await getattr(self.conn, method)(query, *args, **kwargs)

        async def dry() -> Any:
            return await _rolled_back(self.conn, method, query, args, kwargs)

        return await self.injector.call(
            method,
            query,
            args,
            real,
            dry,
            in_transaction=self._depth > 0,
            lost_on_commit=self._lose_on_commit if self._depth > 0 else None,
        )

    def _lose_on_commit(self, error: Exception) -> None:
        self._lost = error


class FaultyTransaction:
    """``conn.transaction()``: a reply lost inside it is raised once it has committed."""

    def __init__(self, conn: FaultyConnection, transaction: Any) -> None:
        self._conn = conn
        self._transaction = transaction

    async def __aenter__(self) -> FaultyTransaction:
        await self._transaction.__aenter__()
        self._conn._depth += 1
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._conn._depth -= 1
        await self._transaction.__aexit__(exc_type, exc, tb)
        if self._conn._depth == 0 and self._conn._lost is not None:
            lost, self._conn._lost = self._conn._lost, None
            if exc_type is None:
                raise lost

    async def start(self) -> None:
        await self._transaction.start()
        self._conn._depth += 1

    async def commit(self) -> None:
        self._conn._depth -= 1
        await self._transaction.commit()
        if self._conn._depth == 0 and self._conn._lost is not None:
            lost, self._conn._lost = self._conn._lost, None
            raise lost

    async def rollback(self) -> None:
        self._conn._depth -= 1
        await self._transaction.rollback()
        if self._conn._depth == 0:
            self._conn._lost = None


async def _rolled_back(
    conn: db.PoolConnection, method: str, query: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Run a call in a transaction (a savepoint, inside one) and roll it back."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        return await getattr(conn, method)(query, *args, **kwargs)
    finally:
        with anyio.CancelScope(shield=True):
            await transaction.rollback()


def install(daemon: Daemon, *faults: Fault) -> FaultyPool:
    """Put a FaultyPool between a started daemon and its pool (or arm the one there)."""
    current: Any = daemon.store.pool
    if isinstance(current, FaultyPool):
        current.arm(*faults)
        return current
    faulty = FaultyPool(daemon.store.pool, faults)
    daemon.store.pool = cast("db.Pool", faulty)
    return faulty


# ---------------------------------------------------------------- a watched daemon


@dataclass
class Watch:
    daemon: Daemon
    faulty: FaultyPool
    #: What the daemon died of, if it did.
    died: BaseException | None = None
    stopped: bool = False

    @property
    def alive(self) -> bool:
        return self.died is None and not self.stopped

    def assert_alive(self) -> None:
        if self.died is not None:
            raise AssertionError(
                f"daemon {self.daemon.name} died: {describe(self.died)}"
            ) from self.died


def describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


def _not_cancellation(exc: BaseException) -> BaseException | None:
    """The part of ``exc`` that is not the test's own cancellation."""
    cancelled = anyio.get_cancelled_exc_class()
    if isinstance(exc, BaseExceptionGroup):
        _, rest = exc.split(cancelled)
        return rest
    return None if isinstance(exc, cancelled) else exc


@asynccontextmanager
async def faulty_daemon(url: str, *faults: Fault, **config: Any) -> AsyncIterator[Watch]:
    """A daemon serving ``url`` through a FaultyPool until the block ends.

    Unlike tests.support.running_daemon, a daemon that dies does not cancel the block:
    what killed it is kept in ``Watch.died`` for the test to report.
    """
    config.setdefault("poll_interval", 0.1)
    config.setdefault("shutdown_timeout", 2.0)
    config.setdefault("health_addr", "127.0.0.1:0")
    daemon = Daemon(DaemonConfig(database_url=url, **config))
    watch: Watch | None = None

    async def run(*, task_status: anyio.abc.TaskStatus[Daemon]) -> None:
        try:
            await daemon.run(task_status=task_status)
        except BaseException as exc:
            rest = _not_cancellation(exc)
            if rest is None:
                raise
            log.error("daemon died", name=daemon.name, error=describe(rest))
            if watch is None:
                raise  # it never started
            watch.died = rest

    async with anyio.create_task_group() as tg:
        await tg.start(run)
        watch = Watch(daemon, install(daemon, *faults))
        try:
            yield watch
        finally:
            daemon.request_stop()
    assert watch is not None
    if watch.died is None:
        watch.stopped = True
