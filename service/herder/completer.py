"""Writing outcomes back: the completer writes them many per statement, and the settler
settles the jobs whose tasks were written."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import asyncpg
import structlog

from herder.metrics import Metrics
from herder.resilience import TRANSIENT
from herder.signals import Wakeup
from herder.states import TaskStatus
from herder.store import Outcome, Store

log = structlog.get_logger("herder.completer")


class Completer:
    """Writes the outcomes handed to ``add``, and settles their jobs.

    ``on_written`` is told of each batch once it is written, so the worker lets go of its
    tasks; ``held_jobs`` says which jobs the worker still holds a task of.
    """

    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        *,
        batch: int,
        flush_seconds: float,
        poll_interval: float,
        on_written: Callable[[list[Outcome]], None],
        held_jobs: Callable[[], set[int]],
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.batch = batch
        self.flush_seconds = flush_seconds
        self.poll_interval = poll_interval
        self._on_written = on_written
        self._held_jobs = held_jobs
        self._outcomes: list[Outcome] = []
        self._ready = Wakeup()
        self._lock = anyio.Lock()
        self._closing = False
        self._done = anyio.Event()
        #: Jobs of written outcomes, for the settler.
        self._unsettled: set[int] = set()
        self._settle_ready = Wakeup()

    def add(self, outcome: Outcome) -> None:
        self._outcomes.append(outcome)
        self._ready.set()

    async def drain(self) -> None:
        """No more outcomes will be added: return once the completer has written all."""
        self._closing = True
        self._ready.set()
        await self._done.wait()

    async def run(self) -> None:
        while True:
            if not self._outcomes:
                if self._closing:
                    self._done.set()
                    return
                await self._ready.wait(self.poll_interval)
                continue
            if len(self._outcomes) < self.batch:
                await anyio.sleep(self.flush_seconds)  # let a batch gather
            await self.flush()

    async def flush(self) -> None:
        async with self._lock:
            while self._outcomes:
                batch = self._outcomes[: self.batch]
                # Removed only once written: a database outage retries the same batch, and
                # writing an outcome twice changes nothing (the second is fenced out).
                applied = await self._write(batch)
                del self._outcomes[: len(batch)]
                self._on_written(batch)
                self.metrics.finished((o.kind, o.status, o.seconds) for o in batch)
                if len(applied) < len(batch):
                    stale = len(batch) - len(applied)
                    log.info(
                        "discarded stale outcomes (canceled, rescued or restarted)", tasks=stale
                    )
                self._unsettled.update(job_id for _, job_id in applied)
                self._settle_ready.set()

    async def run_settler(self) -> None:
        """Settles the jobs whose tasks the completer wrote. Apart from the completer, so
        that the next batch of outcomes is written while these jobs settle (with many
        small jobs, settling is as costly as the write)."""
        while True:
            await self._settle_ready.wait(self.poll_interval)
            await self.settle()

    async def settle(self) -> None:
        # A job the worker still holds a task of cannot settle yet (that task is
        # running, or whoever took it from us settles), so it is not even asked: the
        # candidate query is the costliest part of settling a big job.
        jobs, self._unsettled = self._unsettled - self._held_jobs(), set()
        if not jobs:
            return
        try:
            self.metrics.settled(await self.store.settle_jobs(jobs))
        except BaseException:
            self._unsettled |= jobs  # tried again when the settler restarts
            raise

    async def _write(self, batch: list[Outcome]) -> list[tuple[int, int]]:
        """complete_tasks, contained: when PostgreSQL refuses the batch for what one
        outcome holds (anything but the database being away), the outcomes are written
        one by one, and each refused one as a FAILURE that says why."""
        try:
            return await self.store.complete_tasks(batch)
        except TRANSIENT:
            raise
        except asyncpg.PostgresError as exc:
            log.error("completion batch refused; writing one by one", error=str(exc))
        applied: list[tuple[int, int]] = []
        for outcome in batch:
            try:
                applied += await self.store.complete_tasks([outcome])
            except TRANSIENT:
                raise
            except asyncpg.PostgresError as exc:
                log.error("outcome refused", task_id=outcome.task_id, error=str(exc))
                refused = Outcome(
                    outcome.task_id,
                    outcome.job_id,
                    outcome.attempt,
                    TaskStatus.FAILURE.value,
                    f"the database refused the task's outcome: {exc}",
                    kind=outcome.kind,
                    seconds=outcome.seconds,
                )
                applied += await self.store.complete_tasks([refused])
        return applied
