"""A kind declared with ``executor="process"`` runs its plain ``process`` in worker
processes: CPU-bound code (regular expressions over reports, parsing) then competes with
the daemon for a core, never for the interpreter lock, so leases are renewed and
/healthz answers meanwhile.

Each worker process imports the daemon's ``--app`` modules once and then runs one task at
a time, sent over a pipe as plain data. A task past its timeout, or whose job was
canceled, has its process killed (threads cannot be stopped; processes can) and replaced
on the next use; a process that dies under a task (a segfault, ``os._exit``) fails that
task only, retried like a lost worker's.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, fields
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any, cast

import anyio
import anyio.to_thread

from herder.kinds import (
    JSON,
    KIND_CODE_ERRORS,
    FinishedJob,
    JobContext,
    TaskContext,
    get_kind,
    load_app,
    message_of,
)
from herder.kinds.plain import _next_chunk

if TYPE_CHECKING:
    from herder.db import Pool

#: Seconds a killed or retired process is given to go before it is killed outright.
EXIT_GRACE = 2.0


class ProcessDied(Exception):
    """The worker process running a task died (or could not start): the task is
    retried, like a task whose daemon was lost."""


@dataclass(eq=False)  # identity: workers are kept in a set
class _Worker:
    process: BaseProcess
    conn: Connection


class _Pool:
    """Idle worker processes, started on demand (at most one per executor of the
    daemon, since each runs one task at a time)."""

    def __init__(self) -> None:
        self.apps: list[str] = []
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()

    async def call(self, op: str, kind: str, context: Any) -> Any:
        """Run a kind's plain ``op`` handler (process, on_finished) in a worker process."""
        async with self._worker() as worker:
            worker.conn.send((op, kind, _plain_data(context)))
            status, value = await _receive(worker)
        if status == "raised":
            raise value
        return value

    async def iterate(self, kind: str, context: Any) -> AsyncIterator[Any]:
        """A kind's plain prepare, run in a worker process, its payloads sent back a
        chunk at a time (the pipe's buffer holds the process back while the daemon
        writes what it has)."""
        async with self._worker() as worker:
            worker.conn.send(("prepare", kind, _plain_data(context)))
            while True:
                status, value = await _receive(worker)
                if status == "raised":
                    raise value
                if status == "done":
                    return
                for payload in value:
                    yield payload

    @contextlib.asynccontextmanager
    async def _worker(self) -> AsyncIterator[_Worker]:
        """An idle worker process (or a new one), back to the idle ones when what ran in
        it ended as it should; killed otherwise (a timeout, a cancel, a prepare closed
        early, a death)."""
        worker = self._idle.pop() if self._idle else await self._start()
        healthy = False
        try:
            yield worker
            healthy = True
        except (EOFError, OSError) as exc:
            code = await _reap(worker.process)
            raise ProcessDied(f"the handler's process died (exit code {code})") from exc
        except Exception:
            healthy = True  # the handler raised, and said so: the process is fine
            raise
        finally:
            if healthy:
                self._idle.append(worker)
            else:
                self._all.discard(worker)
                with anyio.CancelScope(shield=True):
                    await _reap(worker.process)

    async def _start(self) -> _Worker:
        spawn = multiprocessing.get_context("spawn")
        parent, child = spawn.Pipe()
        process = spawn.Process(target=_serve, args=(child, self.apps), daemon=True)
        try:
            await anyio.to_thread.run_sync(process.start)
        except OSError as exc:
            raise ProcessDied(f"could not start a worker process: {exc}") from exc
        finally:
            child.close()
        worker = _Worker(process, parent)
        self._all.add(worker)
        return worker

    def close(self) -> None:
        """Kill every worker process (the daemon is stopping)."""
        for worker in self._all:
            worker.process.kill()
            worker.process.join(EXIT_GRACE)
        self._all.clear()
        self._idle.clear()


_pool = _Pool()


def configure(apps: list[str]) -> None:
    """The modules a worker process imports to find the kinds (the daemon's --app)."""
    _pool.apps = list(apps)


async def run(kind: str, context: TaskContext) -> JSON:
    return await _pool.call("process", kind, context)


async def on_finished(kind: str, job: FinishedJob) -> None:
    await _pool.call("on_finished", kind, job)


def prepare(kind: str, context: JobContext) -> AsyncIterator[JSON]:
    return _pool.iterate(kind, context)


def _plain_data(context: Any) -> dict[str, Any]:
    """A context as plain data: everything but the daemon's pool."""
    return {f.name: getattr(context, f.name) for f in fields(context) if f.name != "pool"}


async def _receive(worker: _Worker) -> tuple[str, Any]:
    reply: tuple[str, Any] = await anyio.to_thread.run_sync(
        worker.conn.recv, abandon_on_cancel=True
    )
    return reply


def close() -> None:
    _pool.close()


async def _reap(process: BaseProcess) -> int | None:
    """Kill the process (a no-op if it is gone) and wait for it; its exit code."""
    process.kill()
    await anyio.to_thread.run_sync(process.join, EXIT_GRACE)
    return process.exitcode


class _NoPool:
    """TaskContext.pool in a worker process: the daemon's pool lives in the daemon."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(
            "a handler running in a worker process has no database pool: open a "
            "connection of its own"
        )


#: What a handler in a worker process gets for its context's pool.
NO_POOL = cast("Pool", _NoPool())


def _serve(conn: Connection, apps: list[str]) -> None:
    """A worker process: run the tasks sent to it, one at a time, until the pipe closes."""
    for module in apps:
        load_app(module)
    while True:
        try:
            op, kind_name, data = conn.recv()
        except EOFError:
            return
        try:
            handler = _plain_handler(op, kind_name)
            if op == "prepare":
                iterator = iter(handler(JobContext(**data, pool=NO_POOL)))
                while True:
                    chunk, done = _next_chunk(iterator)
                    pickle.dumps(chunk)
                    conn.send(("items", chunk))
                    if done:
                        break
                conn.send(("done", None))
            else:
                context = (TaskContext if op == "process" else FinishedJob)(**data, pool=NO_POOL)
                value = handler(context)
                pickle.dumps(value)
                conn.send(("returned", value))
        except KIND_CODE_ERRORS as exc:
            conn.send(("raised", _sendable(exc)))


def _plain_handler(op: str, kind_name: str) -> Callable[[Any], Any]:
    kind = get_kind(kind_name)
    handler = None if kind is None else kind.plain_handlers.get(op)
    if handler is None:
        raise RuntimeError(
            f"kind {kind_name!r} has no plain {op} declared in the worker process: declare "
            "it in a module the daemon loads with --app"
        )
    return handler


def _sendable(exc: BaseException) -> BaseException:
    """The exception, with the worker's traceback as a note, or a stand-in: one that
    cannot be pickled, or not unpickled (an __init__ with required arguments other than
    the message), would fail in the daemon under a misleading name."""
    where = f"in worker process {os.getpid()}:\n"
    try:
        where += traceback.format_exc()
    except Exception:  # a hostile exception can break the formatting too
        where += "(the traceback could not be formatted)"
    try:
        exc.add_note(where)
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        stand_in = RuntimeError(f"{type(exc).__name__}: {message_of(exc)}")
        stand_in.add_note(where)
        return stand_in
