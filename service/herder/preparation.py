"""How one preparation's payloads become committed tasks.

The kind's ``prepare`` is read in batches (``batches``). A job whose whole preparation
fits its first batch is *small*: ``SmallJobs`` commits it together with other small jobs,
many per statement, so a stream of small jobs costs a few statements per hundred jobs,
not several per job. A bigger job is *long*: its batches load in order on several
connections (``write_in_order``) while ``prepare`` builds the next ones.

Either way a job's tasks cannot start early: claims join only PENDING and IN_PROGRESS
jobs, and a job becomes PENDING in the statement that commits its last batch.
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import asyncpg
from anyio.streams.memory import MemoryObjectReceiveStream
from prometheus_client import Counter

from herder.db import PoolConnection, encode_json
from herder.kinds import KIND_CODE_ERRORS, InvalidPayload, JobContext, Kind
from herder.resilience import TRANSIENT
from herder.signals import Wakeup
from herder.store import PreparationClaim, SmallPreparation, Store

#: Batches of one preparation loading at the same time, each on its own connection.
LOADING_BATCHES = 2
#: Tasks one small-jobs statement writes at most.
SMALL_JOBS_ROWS = 10_000
#: Tasks a small-jobs statement writes from which it skips the foreign key's checks.
UNCHECKED_ROWS = 200
#: Rows from which a batch goes in by COPY.
COPY_THRESHOLD = 1000

Rows = list[tuple[int, int, bytes]]


class PrepareRaised(Exception):
    """The kind's prepare raised (the cause): the job fails. Kept apart from errors of
    herder's own writes, which may only mean the database is briefly away.
    (InvalidPayload passes through unwrapped: its message is the job's message.)"""


@dataclass(slots=True)
class Batch:
    rows: Rows
    #: jobs.prepared before this batch: the batch commits only over exactly this count.
    first: int
    #: The last batch: it commits the job PENDING.
    last: bool
    #: Set once the batch before this one is through (None: this is the first).
    previous: anyio.Event | None
    through: anyio.Event = field(default_factory=anyio.Event)


async def batches(
    job: PreparationClaim,
    kind: Kind,
    context: JobContext,
    *,
    batch_size: int,
    flush_seconds: float,
) -> AsyncGenerator[Batch, None]:
    """The job's task rows in batches of ``batch_size``, or whatever ``prepare`` yielded
    within ``flush_seconds`` (a slow prepare still makes progress). The last batch is
    marked, and may be empty."""
    seq = job.prepared
    to_skip = 0 if kind.prepare_resumes else job.prepared
    rows: Rows = []
    started = time.monotonic()
    previous: anyio.Event | None = None
    async with contextlib.aclosing(_kind_code(kind, context)) as payloads:
        async for payload in payloads:
            if to_skip:
                to_skip -= 1
                continue
            if seq >= context.max_tasks:
                # Limits before work: stop at the first task past the limit, not after
                # the database has taken millions of rows.
                raise InvalidPayload(
                    f"the job has more than {context.max_tasks} tasks "
                    "(herder.settings max_tasks_per_job)"
                )
            rows.append((job.id, seq, _encoded(payload, seq)))
            seq += 1
            if len(rows) >= batch_size or time.monotonic() - started >= flush_seconds:
                batch = Batch(rows, seq - len(rows), last=False, previous=previous)
                yield batch
                previous = batch.through
                rows = []
                started = time.monotonic()
    yield Batch(rows, seq - len(rows), last=True, previous=previous)


async def write_in_order(
    store: Store,
    name: str,
    lease: float,
    job: PreparationClaim,
    kind: Kind,
    tally: Counter,
    first: Batch,
    rest: AsyncIterator[Batch],
) -> int | None:
    """Commit a long preparation's batches; returns the task count, or None when the job
    stopped being ours.

    Batches are built while earlier ones are loading, and up to LOADING_BATCHES load at
    once on their own connections, so the kind's code and the database (both of its
    cores, on a small machine) work at the same time. They still commit one after
    another, in order (see OrderedWriter).
    """
    writer = OrderedWriter(store, name, lease, job, kind.max_attempts)
    send, receive = anyio.create_memory_object_stream[Batch](1)
    total = 0
    try:
        async with anyio.create_task_group() as writing:
            async with receive:
                for _ in range(LOADING_BATCHES):
                    writing.start_soon(writer.run, receive.clone(), writing.cancel_scope, tally)
            async with send:
                batch = first
                while True:
                    await send.send(batch)
                    total = batch.first + len(batch.rows)
                    if batch.last:
                        break
                    batch = await anext(rest)
    except BaseExceptionGroup as group:
        # One task failed (the others were cancelled): raise what it raised.
        if len(group.exceptions) == 1:
            raise group.exceptions[0]  # noqa: B904 (from would replace its __cause__)
        raise
    return total if writer.held else None


class OrderedWriter:
    """Loads a preparation's batches on several connections and commits them in order.

    Each batch's rows go in (COPY) as soon as a connection is free, but its transaction
    commits only after the batch before it is through, and the database checks that
    order again (write_batch commits over `prepared` equal to the batch's start). So
    `jobs.prepared` always counts a gap-free prefix of committed tasks, however the loads
    interleave, and a batch after one that failed or found the job gone rolls back.
    """

    def __init__(
        self, store: Store, name: str, lease: float, job: PreparationClaim, max_attempts: int
    ) -> None:
        self.store = store
        self.name = name
        self.lease = lease
        self.job = job
        self.max_attempts = max_attempts
        #: False once a batch found the job no longer ours.
        self.held = True

    async def run(
        self, batches: MemoryObjectReceiveStream[Batch], stop: anyio.CancelScope, tally: Counter
    ) -> None:
        async with batches:
            async for batch in batches:
                if not await self.write(batch):
                    stop.cancel()  # the job was canceled, restarted or taken over
                    return
                tally.inc(len(batch.rows))

    async def write(self, batch: Batch) -> bool:
        """Commit a batch once the batch before it is through (at once, for the first);
        False, with nothing written, when the job is no longer ours."""
        written = await self._load_and_commit(batch)
        if not written:
            self.held = False
        batch.through.set()
        return written

    async def _load_and_commit(self, batch: Batch) -> bool:
        modes = await self.store.copy_modes()
        async with self.store.pool.acquire() as conn:
            # COPY is the fastest way in, but costs extra round trips: big batches only.
            if not (modes.copy and len(batch.rows) >= COPY_THRESHOLD):
                return await self._turn(batch) and await self._commit(conn, batch, batch.rows)
            transaction = conn.transaction()
            await transaction.start()
            written = False
            try:
                # The foreign key checks each row with a query of its own, the costliest
                # part of a COPY. These rows need no check: this same transaction commits
                # them only if the fenced write below finds their job, and locks it
                # against deletion until then.
                if modes.unchecked:
                    await self.store.skip_row_triggers(conn)
                await self.store.copy_tasks(conn, batch.rows)
                if modes.unchecked:
                    await self.store.fire_row_triggers(conn)
                written = await self._turn(batch) and await self._commit(conn, batch, ())
            finally:
                if written:
                    await transaction.commit()
                else:
                    await transaction.rollback()  # not ours (or failed): no row of it stays
            return written

    async def _turn(self, batch: Batch) -> bool:
        """Wait for the batch before to be through; may this one commit?"""
        if batch.previous is not None:
            await batch.previous.wait()
        return self.held

    async def _commit(
        self, conn: PoolConnection, batch: Batch, rows: Sequence[tuple[int, int, bytes]]
    ) -> bool:
        """The fenced write: ``rows`` (none when COPY loaded them) and the job's count."""
        end = batch.first + len(batch.rows)
        if batch.last:
            return await self.store.write_last_batch(
                conn,
                self.job,
                self.name,
                rows,
                prepared_before=batch.first,
                prepared_after=end,
                max_attempts=self.max_attempts,
            )
        return await self.store.write_batch(
            conn,
            self.job,
            self.name,
            rows,
            prepared_before=batch.first,
            prepared_after=end,
            lease=self.lease,
        )


@dataclass(slots=True)
class _Waiting:
    job: SmallPreparation
    done: anyio.Event = field(default_factory=anyio.Event)
    written: bool = False
    error: BaseException | None = None


class SmallJobs:
    """Commits whole small preparations together, up to SMALL_JOBS_ROWS tasks per
    statement: preparations that finish while a statement is in flight go in the next
    one. Each job is fenced on its own, so one that was canceled or taken over meanwhile
    is simply left out; should PostgreSQL refuse a statement for what one job holds, the
    jobs are tried one by one, so that only that job fails."""

    def __init__(self, store: Store, name: str) -> None:
        self.store = store
        self.name = name
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._ready = Wakeup()

    async def commit(self, job: SmallPreparation) -> bool:
        """Commit the job's tasks and make it PENDING; False when it is no longer ours."""
        waiting = _Waiting(job)
        self._waiting.append(waiting)
        self._ready.set()
        await waiting.done.wait()
        if waiting.error is not None:
            raise waiting.error
        return waiting.written

    async def run(self) -> None:
        while True:
            await self._ready.wait()
            while self._waiting:
                group: list[_Waiting] = []
                rows = 0
                while self._waiting and (not group or rows < SMALL_JOBS_ROWS):
                    waiting = self._waiting.popleft()
                    group.append(waiting)
                    rows += len(waiting.job.rows)
                await self._write(group)

    async def _write(self, group: list[_Waiting]) -> None:
        try:
            written = await self._commit([w.job for w in group])
        except TRANSIENT as exc:
            for waiting in group:
                waiting.error = exc
        except asyncpg.PostgresError as exc:
            if len(group) == 1:
                group[0].error = exc
            else:
                for waiting in group:
                    await self._write([waiting])
                return
        else:
            for waiting in group:
                waiting.written = waiting.job.claim.id in written
        for waiting in group:
            waiting.done.set()

    async def _commit(self, jobs: list[SmallPreparation]) -> set[int]:
        modes = await self.store.copy_modes()
        rows = sum(len(job.rows) for job in jobs)
        async with self.store.pool.acquire() as conn:
            if not (modes.unchecked and rows >= UNCHECKED_ROWS):
                return await self.store.write_small_preparations(conn, jobs, self.name)
            async with conn.transaction():
                # The foreign key checks each row with a query of its own, and these rows
                # need none: the statement writes them only for jobs it holds locked. (The
                # jobs' own row triggers are skipped with them: the only one an UPDATE of
                # `prepared` fires checks max_tasks_per_job, which the preparation has
                # already enforced.) Only for many rows: the transaction around it costs
                # three round trips, which a job of a few tasks would wait for.
                await self.store.skip_row_triggers(conn)
                return await self.store.write_small_preparations(conn, jobs, self.name)


async def _kind_code(kind: Kind, context: JobContext) -> AsyncGenerator[Any, None]:
    """The kind's prepare, with everything it raises (SystemExit and the like included)
    wrapped in PrepareRaised: the kind's code fails its job, never the daemon."""
    try:
        payloads = kind.prepare_fn(context)
        iterator = aiter(payloads)
    except InvalidPayload:
        raise
    except KIND_CODE_ERRORS as exc:
        raise PrepareRaised from exc
    try:
        while True:
            try:
                payload = await anext(iterator)
            except StopAsyncIteration:
                return
            except InvalidPayload:
                raise
            except KIND_CODE_ERRORS as exc:
                raise PrepareRaised from exc
            yield payload
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(*KIND_CODE_ERRORS):
                await aclose()


def _encoded(payload: Any, seq: int) -> bytes:
    """Serialise once: this both validates the payload and is what COPY sends."""
    try:
        return encode_json(payload)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidPayload(
            f"prepare yielded a task payload that is not JSON (task {seq}): {exc}"
        ) from exc
