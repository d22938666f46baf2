"""The coordinator: claims PREPARING jobs and has them prepared (see preparation.py).

Many preparations run at once, as coroutines: a small one (its whole prepare fits one
batch) is committed together with other small ones, so a stream of small jobs moves at
the speed of a few statements per hundred jobs, and never waits behind a long
preparation. A long one takes one of ``max_preparations`` long slots for its ordered,
batched loading.
"""

from __future__ import annotations

import collections
import contextlib
import time
from typing import Any

import anyio
import asyncpg
import structlog

from herder.db import Undecodable
from herder.kinds import (
    InvalidPayload,
    JobContext,
    Kind,
    describe,
    get_kind,
    known_kinds,
    message_of,
    runs_finish_hook,
)
from herder.metrics import Metrics
from herder.preparation import PrepareRaised, SmallJobs, batches, write_in_order
from herder.resilience import TRANSIENT, is_transient, keep_renewing, retrying
from herder.signals import Wakeup
from herder.store import PreparationClaim, SmallPreparation, Store

log = structlog.get_logger("herder.coordinator")

#: Preparations held at once: small ones are mostly waiting on the database, so many can
#: overlap.
MAX_HELD_PREPARATIONS = 256
#: Preparations claimed in one statement at most: a claim goes out while the preparations
#: claimed before it are still being written, instead of after them.
CLAIM_PREPARATIONS = 64
#: Unexpected errors preparing one job before it fails (see Coordinator._unexpected).
MAX_TROUBLES = 3


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
        kinds: list[str] | None = None,
    ) -> None:
        """``kinds``: the kinds this daemon serves (None: any)."""
        self.store = store
        self.kinds = kinds
        self.name = name
        self.metrics = metrics
        self.lease = lease
        self.poll_interval = poll_interval
        self.batch_size = batch_size
        self.flush_seconds = flush_seconds
        self.wakeup = Wakeup()
        self._intake = anyio.Semaphore(MAX_HELD_PREPARATIONS)
        self._long_slots = anyio.Semaphore(max_preparations)
        self._small_jobs = SmallJobs(store, name)
        #: Preparations this daemon holds, by (job id, generation): a job canceled and
        #: resumed while its old preparation winds down is held twice, under two keys.
        self._held: dict[tuple[int, int], PreparationClaim] = {}
        self._scopes: dict[tuple[int, int], anyio.CancelScope] = {}
        #: Unexpected errors (not the kind's) while preparing each job, by job id.
        self._troubles: collections.Counter[int] = collections.Counter()
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
            tg.start_soon(self._small_jobs.run)
            while not self._stopping:
                # Claim as many as there are free places, in one statement.
                await self._intake.acquire()
                places = 1
                while self._intake.value and places < CLAIM_PREPARATIONS:
                    self._intake.acquire_nowait()
                    places += 1
                try:
                    jobs = await self.store.claim_preparations(
                        self.name, self.lease, places, self.kinds
                    )
                except BaseException:
                    for _ in range(places):
                        self._intake.release()
                    raise
                for _ in range(places - len(jobs)):
                    self._intake.release()
                for job in jobs:
                    self._held[job.key] = job
                    self._scopes[job.key] = anyio.CancelScope()
                    tg.start_soon(self._prepare_in_slot, job)
                if len(jobs) < places:
                    await self.wakeup.wait(self.poll_interval)
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
            self._troubles.pop(job.id, None)
        except Exception as exc:
            if is_transient(exc):
                # The database is away: handed back (or, if it does not answer, held
                # until the lease runs out), any daemon resumes it where it stopped.
                bound.warning("preparation interrupted: database unreachable", error=str(exc))
                await self._hand_back(job, timeout=2)
            else:
                await self._unexpected(job, exc, bound)
        finally:
            del self._scopes[job.key]
            del self._held[job.key]
            self._intake.release()

    async def _unexpected(self, job: PreparationClaim, exc: Exception, bound: Any) -> None:
        """Not the kind's code (that fails the job in _prepare) but herder's own, or the
        database refusing one of herder's statements. Once may be bad luck: the job is
        handed back and prepared again. The third time it fails, with the reason; either
        way the daemon serves on."""
        self._troubles[job.id] += 1
        if self._troubles[job.id] < MAX_TROUBLES:
            bound.error("preparation failed unexpectedly; trying again", exc_info=exc)
            await self._hand_back(job, timeout=2)
            self.wakeup.set()
            return
        bound.error("preparation failed unexpectedly; the job fails", exc_info=exc)
        del self._troubles[job.id]
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            try:
                await self._fail(job, f"herder could not prepare the job: {describe(exc)}", bound)
            except Exception:
                bound.exception("could not record the failure; the lease will run out")

    async def _hand_back(self, job: PreparationClaim, *, timeout: float) -> None:
        """Release a preparation for another claim; if the database does not answer,
        its lease runs out instead."""
        with anyio.CancelScope(shield=True):
            await retrying(
                f"hand back the preparation of job {job.id}",
                lambda: self.store.release_preparation(job, self.name),
                timeout=timeout,
            )

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
        except PrepareRaised as raised:
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
            self.metrics.settled(await self.store.settle_jobs([job.id]))

    async def _fail(
        self, job: PreparationClaim, message: str, bound: Any, *, run_hook: bool | None = None
    ) -> None:
        """Fail the job (if this preparation still holds it), then delete what it wrote.
        Its on_finished runs unless ``run_hook`` says otherwise or the kind has none."""
        if run_hook is None:
            run_hook = runs_finish_hook(job.kind)
        bound.warning("job failed", reason=message)
        if await self.store.fail_preparation(job, self.name, message, run_hook=run_hook):
            await self.store.discard_stale_tasks(job.id)

    async def _write_tasks(
        self, job: PreparationClaim, kind: Kind, context: JobContext
    ) -> int | None:
        """Run prepare and commit its tasks: with other small jobs when the whole of it
        fits the first batch, else batch by batch in a long slot. Returns the task count,
        or None when the job stopped being ours."""
        async with contextlib.aclosing(
            batches(
                job,
                kind,
                context,
                batch_size=self.batch_size,
                flush_seconds=self.flush_seconds,
            )
        ) as built:
            first = await anext(built)
            if first.last and job.prepared == 0 and not job.stale_tasks:
                small = SmallPreparation(job, first.rows, kind.max_attempts)
                if not await self._small_jobs.commit(small):
                    return None
                self.metrics.tasks_prepared.labels(job.kind).inc(len(first.rows))
                return len(first.rows)
            async with self._long_slots:
                return await write_in_order(
                    self.store,
                    self.name,
                    self.lease,
                    job,
                    kind,
                    self.metrics.tasks_prepared.labels(job.kind),
                    first,
                    built,
                )
