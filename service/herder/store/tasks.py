"""Statements of tasks: claiming, starting their jobs, completing, releasing, renewing
and rescuing them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from herder.db import Pool
from herder.sql import QUERIES as Q
from herder.store.arguments import MESSAGE_LIMIT, TRACEBACK_LIMIT, columns, storable


@dataclass(slots=True)
class ClaimedTask:
    id: int
    job_id: int
    seq: int
    payload: Any
    attempts: int
    attempts_base: int
    kind: str
    #: The job's status when the task was claimed.
    job_status: str
    #: Its job was canceled or restarted while the task waited in the local queue.
    stopped: bool = False
    #: Its job's priority: the local queue runs higher priorities first.
    priority: int = 0

    @property
    def key(self) -> tuple[int, int]:
        """(task id, attempt): one attempt of the task. A task rescued and claimed again
        by the same daemon is a different attempt, held separately."""
        return (self.id, self.attempts)


@dataclass(slots=True)
class Outcome:
    """How one attempt of a task ended; written by ``Store.complete_tasks``."""

    task_id: int
    job_id: int
    attempt: int
    #: A final task status, or PENDING to run again after ``delay`` seconds.
    status: str
    message: str | None = None
    result_json: str | None = None
    traceback: str | None = None
    delay: float = 0.0
    # Not written: for metrics.
    kind: str = ""
    seconds: float = 0.0

    @property
    def key(self) -> tuple[int, int]:
        return (self.task_id, self.attempt)

    @property
    def is_plain_success(self) -> bool:
        return (
            self.status == "SUCCESS"
            and self.message is None
            and self.result_json is None
            and self.traceback is None
        )


class TaskStatements:
    pool: Pool

    async def claim_tasks(
        self,
        limit: int,
        worker: str,
        lease: float,
        kinds: list[str] | None = None,
        *,
        fair: bool = True,
    ) -> list[ClaimedTask]:
        """Up to ``limit`` tasks of ``kinds`` (None: any), shared fairly unless ``fair``
        is False (see herder.claim_tasks in schema.sql)."""
        rows = await self.pool.fetch(
            *Q.bind(
                "claim_tasks",
                batch=limit,
                worker=worker,
                lease_seconds=lease,
                kinds=kinds,
                fair=fair,
            )
        )
        return [
            ClaimedTask(
                r["id"],
                r["job_id"],
                r["seq"],
                r["payload"],
                r["attempts"],
                r["attempts_base"],
                r["kind"],
                r["job_status"],
                priority=r["priority"],
            )
            for r in rows
        ]

    async def start_jobs(self, job_ids: list[int]) -> list[float]:
        """Move jobs PENDING -> IN_PROGRESS; return each started job's commit-to-start
        latency in seconds."""
        rows = await self.pool.fetch(*Q.bind("start_jobs", job_ids=job_ids))
        return [r["latency"] for r in rows]

    async def complete_tasks(self, outcomes: Sequence[Outcome]) -> list[tuple[int, int]]:
        """Write outcomes, many per statement; return the (task_id, job_id) that applied.
        Messages and tracebacks are made storable here (NULs, lone surrogates, length)."""
        plain = [o for o in outcomes if o.is_plain_success]
        detailed = [o for o in outcomes if not o.is_plain_success]
        rows = []
        if plain:
            rows += await self.pool.fetch(
                *Q.bind(
                    "complete_successes",
                    task_ids=[o.task_id for o in plain],
                    attempts=[o.attempt for o in plain],
                )
            )
        if detailed:
            rows += await self.pool.fetch(
                *Q.bind(
                    "complete_tasks",
                    task_ids=[o.task_id for o in detailed],
                    attempts=[o.attempt for o in detailed],
                    statuses=[o.status for o in detailed],
                    messages=[storable(o.message, MESSAGE_LIMIT) for o in detailed],
                    results=[o.result_json for o in detailed],
                    tracebacks=[storable(o.traceback, TRACEBACK_LIMIT) for o in detailed],
                    delays=[o.delay for o in detailed],
                )
            )
        return [(r["id"], r["job_id"]) for r in rows]

    async def release_tasks(self, held: Iterable[tuple[int, int]], worker: str) -> int:
        """Hand (task_id, attempt) back to PENDING without spending the attempt."""
        ids, attempts = columns(held)
        if not ids:
            return 0
        rows = await self.pool.fetch(
            *Q.bind("release_tasks", task_ids=ids, attempts=attempts, worker=worker)
        )
        return len(rows)

    async def renew_task_leases(
        self, held: Iterable[tuple[int, int]], worker: str, lease: float
    ) -> set[tuple[int, int]]:
        """Renew the leases of (task id, attempt) pairs; return those renewed."""
        ids, attempts = columns(held)
        if not ids:
            return set()
        rows = await self.pool.fetch(
            *Q.bind(
                "renew_task_leases",
                task_ids=ids,
                attempts=attempts,
                worker=worker,
                lease_seconds=lease,
            )
        )
        return {(r["id"], r["attempts"]) for r in rows}

    async def my_running_tasks(self, worker: str) -> set[tuple[int, int]]:
        """(task id, attempt) of every task the database says ``worker`` runs."""
        rows = await self.pool.fetch(*Q.bind("my_running_tasks", worker=worker))
        return {(r["id"], r["attempts"]) for r in rows}

    async def rescue_expired_tasks(
        self, rescuer: str, started: datetime | None = None
    ) -> list[tuple[int, int, str]]:
        """Tasks whose lease ran out, other than ``rescuer``'s own, and ``rescuer``'s own
        started before ``started`` (a previous process of the same name)."""
        rows = await self.pool.fetch(
            *Q.bind("rescue_expired_tasks", rescuer=rescuer, rescuer_started=started)
        )
        return [(r["id"], r["job_id"], r["status"]) for r in rows]

    async def jobs_not_running(self, job_ids: Iterable[int]) -> set[int]:
        ids = list(set(job_ids))
        if not ids:
            return set()
        return {r["id"] for r in await self.pool.fetch(*Q.bind("jobs_not_running", job_ids=ids))}
