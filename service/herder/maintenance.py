"""The periodic work under every notification: stopping what the database says must
stop, rescuing the tasks of dead workers, carrying out controls in batches, settling
what nobody settled, and retention.

Notifications only make it look sooner (rate-limited: anyone may NOTIFY); what it stops,
rescues or settles is always read from the database.
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Callable
from datetime import datetime

import anyio
import structlog

from herder.coordinator import Coordinator
from herder.kinds import get_kind
from herder.metrics import Metrics
from herder.resilience import TRANSIENT
from herder.signals import Wakeup
from herder.store import Store
from herder.worker import Worker

log = structlog.get_logger("herder.maintenance")

PRUNE_INTERVAL = 600.0
#: Least time between two looks that notifications asked for.
MIN_CHECK_INTERVAL = 0.1


class Maintenance:
    def __init__(
        self,
        store: Store,
        name: str,
        *,
        worker: Worker,
        coordinator: Coordinator,
        metrics: Metrics,
        poll_interval: float,
        lease: float,
        retention: float,
        wake_all: Callable[[], None],
        started: datetime,
        kinds: list[str],
    ) -> None:
        """``started``: the database's clock before this daemon claimed anything. Tasks
        of this daemon's name that started earlier belong to a previous process."""
        self.store = store
        self.name = name
        self.worker = worker
        self.coordinator = coordinator
        self.metrics = metrics
        self.poll_interval = poll_interval
        self.lease = lease
        self.retention = retention
        self.wake_all = wake_all
        self.started = started
        self.kinds = kinds
        self._kinds_registered = False
        #: False while the last sweep could not reach the database.
        self.database_ok = True
        self._look_now = Wakeup()

    def look_soon(self) -> None:
        """A notification said something may have changed (a cancel, a control): look at
        the database soon, at most every MIN_CHECK_INTERVAL however many arrive."""
        self._look_now.set()

    async def run_sweep(self) -> None:
        """Each poll interval a full sweep; between them, when a notification asks, a
        quick look (stop what must stop, carry out controls). A full sweep runs at least
        four times per lease, so a dead worker's tasks come back within about a lease."""
        interval = min(self.poll_interval, self.lease / 4)
        next_full = 0.0
        while True:
            full = time.monotonic() >= next_full
            try:
                await self._sweep(full=full)
                self.database_ok = True
            except TRANSIENT as exc:
                self.database_ok = False
                log.warning("sweep failed: database unreachable", error=str(exc))
            if full:
                next_full = time.monotonic() + interval
            await anyio.sleep(MIN_CHECK_INTERVAL)
            await self._look_now.wait(max(0.0, next_full - time.monotonic()))

    async def _sweep(self, *, full: bool) -> None:
        await self._stop_what_must_stop()
        await self.store.reopen_tasks()
        # Settling also cancels the pending tasks of CANCELING jobs, in batches.
        self.metrics.settled(await self.store.settle_jobs(None))
        if not full:
            return
        for task_id, job_id, status in await self.store.rescue_expired_tasks(
            self.name, self.started
        ):
            self.metrics.tasks_rescued.inc()
            log.warning("rescued task of a lost worker", task_id=task_id, job_id=job_id, now=status)
        await self.register(starting=False)
        await self.store.expire_daemons()
        self.metrics.jobs_unserved.set(await self.store.mark_unserved_jobs())
        for job_id in await self.store.stale_jobs():
            await self.store.discard_stale_tasks(job_id)
        await self.store.fold_counts()
        self.wake_all()

    async def register(self, *, starting: bool = True) -> None:
        """This daemon's row in herder.daemons, renewed for a lease by every full sweep
        (which runs several times per lease); the first time, the rows of its kinds."""
        if not self._kinds_registered:
            await self.store.register_kinds(
                {name: kind.max_running for name in self.kinds if (kind := get_kind(name))}
            )
            self._kinds_registered = True
        await self.store.register_daemon(
            self.name,
            socket.gethostname(),
            os.getpid(),
            self.kinds,
            self.lease,
            starting=starting,
        )

    async def _stop_what_must_stop(self) -> None:
        held_jobs = self.worker.held_job_ids
        stopped = await self.store.jobs_not_running(held_jobs)
        if stopped:
            self.worker.stop_jobs(stopped)
        lost = await self.store.preparations_lost(self.coordinator.preparing, self.name)
        if lost:
            self.coordinator.stop_preparations(lost)

    async def run_prune(self) -> None:
        """Retention: every PRUNE_INTERVAL (first at a random moment, so a fleet started
        together does not prune together), delete finished jobs past the retention in
        small batches."""
        await anyio.sleep(random.uniform(10, 60))
        while True:
            try:
                jobs, tasks = await self.store.prune(self.retention)
                if jobs:
                    log.info("pruned finished jobs", jobs=jobs, tasks=tasks)
            except TRANSIENT as exc:
                log.warning("prune failed: database unreachable", error=str(exc))
            await anyio.sleep(PRUNE_INTERVAL * random.uniform(0.9, 1.1))
