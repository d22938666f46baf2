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

import multiprocessing
import os
import pickle
import traceback
from dataclasses import dataclass, fields
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import anyio
import anyio.to_thread

from herder.kinds import JSON, KIND_CODE_ERRORS, TaskContext, get_kind, load_app, message_of

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

    async def run(self, kind: str, context: TaskContext) -> JSON:
        worker = self._idle.pop() if self._idle else await self._start()
        healthy = False
        try:
            data = {f.name: getattr(context, f.name) for f in fields(context) if f.name != "pool"}
            worker.conn.send((kind, data))
            status, value = await anyio.to_thread.run_sync(worker.conn.recv, abandon_on_cancel=True)
            healthy = True
        except (EOFError, OSError) as exc:
            code = await _reap(worker.process)
            raise ProcessDied(f"the handler's process died (exit code {code})") from exc
        finally:
            if healthy:
                self._idle.append(worker)
            else:
                self._all.discard(worker)
                with anyio.CancelScope(shield=True):
                    await _reap(worker.process)
        if status == "raised":
            raise value
        return value

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
    return await _pool.run(kind, context)


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


def _serve(conn: Connection, apps: list[str]) -> None:
    """A worker process: run the tasks sent to it, one at a time, until the pipe closes."""
    for module in apps:
        load_app(module)
    while True:
        try:
            kind_name, data = conn.recv()
        except EOFError:
            return
        conn.send(_run_one(kind_name, data))


def _run_one(kind_name: str, data: dict[str, Any]) -> tuple[str, Any]:
    kind = get_kind(kind_name)
    if kind is None or kind.plain_process is None:
        return "raised", RuntimeError(
            f"kind {kind_name!r} is not declared in the worker process: declare it in a "
            "module the daemon loads with --app"
        )
    context = TaskContext(**data, pool=_NoPool())  # type: ignore[arg-type]
    try:
        value = kind.plain_process(context)
        pickle.dumps(value)
        return "returned", value
    except KIND_CODE_ERRORS as exc:
        exc.add_note(f"in worker process {os.getpid()}:\n{traceback.format_exc()}")
        try:
            pickle.dumps(exc)
            return "raised", exc
        except Exception:
            stand_in = RuntimeError(f"{type(exc).__name__}: {message_of(exc)}")
            stand_in.add_note(f"in worker process {os.getpid()}:\n{traceback.format_exc()}")
            return "raised", stand_in
