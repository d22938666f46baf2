"""The coordinator: claims PREPARING jobs and fans them out into tasks.

Tasks are written in COPY batches while ``prepare`` runs, so memory stays bounded, but
they cannot start early: the claim query only joins jobs that are PENDING or IN_PROGRESS,
and the job becomes PENDING in the transaction that writes the last batch.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import asyncpg
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from herder.db import Undecodable, encode_json
from herder.kinds import (
    KIND_CODE_ERRORS,
    InvalidPayload,
    JobContext,
    Kind,
    describe,
    get_kind,
    known_kinds,
    message_of,
)
from herder.metrics import Metrics
from herder.resilience import TRANSIENT, keep_renewing
from herder.signals import Wakeup
from herder.store import PreparationClaim, Store

log = structlog.get_logger("herder.coordinator")


class Coordinator:
    def __init__(
        self,
        store: Store,
        name: str,
        *,
        metrics: Metrics,
        lease: float,
        poll_interval: float,
        max_preparations: int = 2,
        batch_size: int = 10_000,
        flush_seconds: float = 0.25,
    ) -> None:
        self.store = store
        self.name = name
        self.metrics = metrics
        self.lease = lease
        self.poll_interval = poll_interval
        self.batch_size = batch_size
        self.flush_seconds = flush_seconds
        self.wakeup = Wakeup()
        self._slots = anyio.Semaphore(max_preparations)
        #: Preparations this daemon holds, by (job id, generation): a job canceled and
        #: resumed while its old preparation winds down is held twice, under two keys.
        self._held: dict[tuple[int, int], PreparationClaim] = {}
        self._scopes: dict[tuple[int, int], anyio.CancelScope] = {}
        self._stopping = False

    @property
    def preparing(self) -> list[tuple[int, int]]:
        """(job id, generation) of every preparation this daemon holds."""
        return list(self._held)

    def stop_preparations(self, keys: set[tuple[int, int]]) -> None:
        """Stop these preparations now: the database says they are no longer ours
        (canceled, restarted, deleted or taken over)."""
        for key in keys:
            scope = self._scopes.get(key)
            if scope is not None:
                scope.cancel()

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(keep_renewing, "preparation leases", self._renew, self.lease / 3)
            while not self._stopping:
                await self._slots.acquire()
                try:
                    job = await self.store.claim_preparation(self.name, self.lease)
                except BaseException:
                    self._slots.release()
                    raise
                if job is None:
                    self._slots.release()
                    await self.wakeup.wait(self.poll_interval)
                    continue
                self._held[job.key] = job
                self._scopes[job.key] = anyio.CancelScope()
                tg.start_soon(self._prepare_in_slot, job)
            tg.cancel_scope.cancel()

    async def _renew(self) -> bool:
        # One not renewed was lost (the daemon's check stops it) or has just ended:
        # nothing to try again.
        await self.store.renew_preparations(list(self._held), self.name, self.lease)
        return True

    async def stop(self) -> None:
        """Stop claiming, interrupt preparations and hand them back for another daemon."""
        self._stopping = True
        self.wakeup.set()
        for key, job in list(self._held.items()):
            self.stop_preparations({key})
            await self._hand_back(job, timeout=5)

    async def _prepare_in_slot(self, job: PreparationClaim) -> None:
        bound = log.bind(job_id=job.id, kind=job.kind, generation=job.generation)
        try:
            with self._scopes[job.key]:
                await self._prepare(job, bound)
        except TRANSIENT as exc:
            # The database is away: the job stays ours until the lease runs out (or we
            # hand it back), then any daemon resumes it where it stopped.
            bound.warning("preparation interrupted: database unreachable", error=str(exc))
            await self._hand_back(job, timeout=2)
        except Exception as exc:
            # Not the kind's code (that fails the job in _prepare) but herder's own, or
            # the database refusing what herder wrote: the job fails with the reason, and
            # the daemon serves on.
            bound.exception("preparation failed unexpectedly")
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                try:
                    await self._fail(
                        job, f"herder could not prepare the job: {describe(exc)}", bound
                    )
                except Exception:
                    bound.exception("could not record the failure; the lease will run out")
        finally:
            del self._scopes[job.key]
            del self._held[job.key]
            self._slots.release()

    async def _hand_back(self, job: PreparationClaim, *, timeout: float) -> None:
        """Release a preparation for another claim; if the database does not answer,
        its lease runs out instead."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(timeout):
            try:
                await self.store.release_preparation(job, self.name)
            except TRANSIENT as exc:
                log.warning("could not hand back a preparation", job_id=job.id, error=str(exc))

    async def _prepare(self, job: PreparationClaim, bound: Any) -> None:
        if job.stale_tasks:
            # A restarted job: its earlier run's tasks go first, in batches.
            await self.store.discard_stale_tasks(job.id)
        if isinstance(job.payload, Undecodable):
            await self._fail(job, f"payload cannot be decoded: {job.payload.error}", bound)
            return
        kind = get_kind(job.kind)
        if kind is None:
            message = f"unknown kind {job.kind!r} (this daemon knows: {', '.join(known_kinds())})"
            await self._fail(job, message, bound, run_hook=False)  # no kind, no hook
            return
        context = JobContext(
            id=job.id,
            kind=job.kind,
            payload=job.payload,
            priority=job.priority,
            owner=job.owner,
            resume_from=job.prepared,
            max_tasks=job.max_tasks,
            pool=self.store.app_pool,
        )
        bound.info("preparing", resume_from=job.prepared)
        started = time.monotonic()
        try:
            total = await self._write_tasks(job, kind, context)
        except _PrepareRaised as raised:
            exc = raised.__cause__
            bound.error("prepare raised", exc_info=exc)
            await self._fail(job, f"prepare failed: {describe(exc)}", bound)
            return
        except InvalidPayload as exc:  # from prepare, or a payload that is not JSON
            await self._fail(job, f"invalid payload: {message_of(exc)}", bound)
            return
        except asyncpg.PostgresError as exc:
            if isinstance(exc, TRANSIENT):
                raise
            # A limit (max_tasks_per_job) or a payload PostgreSQL cannot store.
            await self._fail(job, f"the database refused the job's tasks: {exc}", bound)
            return
        if total is None:
            bound.info("preparation stopped: job canceled, restarted or taken over")
            return
        bound.info("prepared", tasks=total, seconds=round(time.monotonic() - started, 3))
        if total == 0:
            self.metrics.settled(await self.store.settle([job.id]))

    async def _fail(
        self, job: PreparationClaim, message: str, bound: Any, *, run_hook: bool = True
    ) -> None:
        bound.warning("job failed", reason=message)
        if await self.store.fail_preparation(job, self.name, message, run_hook=run_hook):
            await self.store.discard_stale_tasks(job.id)

    async def _write_tasks(
        self, job: PreparationClaim, kind: Kind, context: JobContext
    ) -> int | None:
        """Run prepare and commit its payloads in batches. Returns the task count, or
        None when the job stopped being ours.

        Batches are built while earlier ones are loading, and up to LOADING_BATCHES load
        at once on their own connections, so the kind's code and the database (both of
        its cores, on a small machine) work at the same time. They still commit one
        after another, in order (see _OrderedWriter).
        """
        writer = _OrderedWriter(self, job, kind)
        send, receive = anyio.create_memory_object_stream[_Batch](1)
        try:
            async with anyio.create_task_group() as writing:
                async with receive:
                    for _ in range(LOADING_BATCHES):
                        writing.start_soon(writer.run, receive.clone(), writing.cancel_scope)
                async with send:
                    total = await self._build_batches(job, kind, context, send)
        except BaseExceptionGroup as group:
            # One task failed (the others were cancelled): raise what it raised.
            if len(group.exceptions) == 1:
                raise group.exceptions[0]  # noqa: B904 (from would replace its __cause__)
            raise
        return total if writer.held else None

    async def _build_batches(
        self,
        job: PreparationClaim,
        kind: Kind,
        context: JobContext,
        batches: MemoryObjectSendStream[_Batch],
    ) -> int:
        seq = job.prepared
        to_skip = 0 if kind.prepare_resumes else job.prepared
        rows: list[tuple[int, int, bytes]] = []
        last_flush = time.monotonic()
        previous: anyio.Event | None = None
        async for payload in _kind_code(kind, context):
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
            if len(rows) >= self.batch_size or (
                time.monotonic() - last_flush >= self.flush_seconds
            ):
                batch = _Batch(rows, seq - len(rows), last=False, previous=previous)
                await batches.send(batch)
                previous = batch.through
                rows = []
                last_flush = time.monotonic()
        await batches.send(_Batch(rows, seq - len(rows), last=True, previous=previous))
        return seq


#: Batches of one preparation loading at the same time, each on its own connection.
LOADING_BATCHES = 2


@dataclass(slots=True)
class _Batch:
    rows: list[tuple[int, int, bytes]]
    #: jobs.prepared before this batch: the batch commits only over exactly this count.
    first: int
    #: The last batch: it commits the job PENDING.
    last: bool
    #: Set once the batch before this one is through (None: this is the first).
    previous: anyio.Event | None
    through: anyio.Event = field(default_factory=anyio.Event)


class _OrderedWriter:
    """Loads a preparation's batches on several connections and commits them in order.

    Each batch's rows go in (COPY) as soon as a connection is free, but its transaction
    commits only after the batch before it is through, and the database checks that
    order again (write_batch commits over `prepared` equal to the batch's start). So
    `jobs.prepared` always counts a gap-free prefix of committed tasks, however the loads
    interleave, and a batch after one that failed or found the job gone rolls back.
    """

    def __init__(self, coordinator: Coordinator, job: PreparationClaim, kind: Kind) -> None:
        self.store = coordinator.store
        self.name = coordinator.name
        self.lease = coordinator.lease
        self.job = job
        self.max_attempts = kind.max_attempts
        self.tally = coordinator.metrics.tasks_prepared.labels(job.kind)
        #: False once a batch found the job no longer ours.
        self.held = True

    async def run(
        self, batches: MemoryObjectReceiveStream[_Batch], stop: anyio.CancelScope
    ) -> None:
        async with batches:
            async for batch in batches:
                written = await self.store.write_tasks(
                    self.job,
                    self.name,
                    batch.rows,
                    batch.first,
                    self.lease,
                    turn=functools.partial(self._turn, batch.previous),
                    finish_max_attempts=self.max_attempts if batch.last else None,
                )
                if not written:
                    self.held = False
                batch.through.set()
                if not self.held:
                    stop.cancel()  # the job was canceled, restarted or taken over
                    return
                self.tally.inc(len(batch.rows))

    async def _turn(self, previous: anyio.Event | None) -> bool:
        """Wait for the batch before to be through; may this one commit?"""
        if previous is not None:
            await previous.wait()
        return self.held


class _PrepareRaised(Exception):
    """The kind's prepare raised (the cause): the job fails. Kept apart from errors of
    herder's own writes, which may only mean the database is briefly away.
    (InvalidPayload passes through unwrapped: its message is the job's message.)"""


async def _kind_code(kind: Kind, context: JobContext) -> AsyncIterator[Any]:
    """The kind's prepare, with everything it raises (SystemExit and the like included)
    wrapped in _PrepareRaised: the kind's code fails its job, never the daemon."""
    try:
        payloads = kind.prepare_fn(context)
        iterator = aiter(payloads)
    except InvalidPayload:
        raise
    except KIND_CODE_ERRORS as exc:
        raise _PrepareRaised from exc
    try:
        while True:
            try:
                payload = await anext(iterator)
            except StopAsyncIteration:
                return
            except InvalidPayload:
                raise
            except KIND_CODE_ERRORS as exc:
                raise _PrepareRaised from exc
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
