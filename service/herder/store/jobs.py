"""Statements people and monitoring run: submitting, controlling and reading jobs, the
queue's depth, the database's clock and settings; and retention."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from herder.db import Pool
from herder.sql import QUERIES as Q
from herder.states import JobStatus

CONTROL_ACTIONS = ("cancel", "resume", "retry", "restart", "verify")


class JobStatements:
    pool: Pool

    async def submit(
        self, kind: str, payload: Any, *, priority: int = 0, unverified: bool = False
    ) -> int:
        status = JobStatus.UNVERIFIED if unverified else JobStatus.PREPARING
        job_id: int = await self.pool.fetchval(
            *Q.bind("submit", kind=kind, payload=payload, priority=priority, status=status.value)
        )
        return job_id

    async def control(self, action: str, job_id: int) -> bool:
        """cancel, resume, retry, restart or verify; True when it applied."""
        if action not in CONTROL_ACTIONS:
            raise ValueError(f"unknown action {action!r}")
        applied: bool = await self.pool.fetchval(*Q.bind(f"{action}_job", job_id=job_id))
        return applied

    async def get_job(self, job_id: int) -> dict[str, Any] | None:
        row = await self.pool.fetchrow(*Q.bind("get_job", job_id=job_id))
        return None if row is None else dict(row)

    async def list_jobs(
        self,
        status: str | None = None,
        limit: int = 50,
        *,
        kind: str | None = None,
        owner: str | None = None,
        since: datetime | None = None,
    ) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            *Q.bind("list_jobs", status=status, limit=limit, kind=kind, owner=owner, since=since)
        )
        return [dict(r) for r in rows]

    async def job_problems(self, job_id: int, limit: int = 5) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(*Q.bind("job_problems", job_id=job_id, limit=limit))
        return [dict(r) for r in rows]

    # ------------------------------------------------------------ health and metrics

    async def max_result_bytes(self) -> int:
        value: int = await self.pool.fetchval(Q["max_result_bytes"])
        return value

    async def database_clock(self) -> datetime:
        now: datetime = await self.pool.fetchval(Q["database_clock"])
        return now

    async def ping(self) -> None:
        await self.pool.fetchval(Q["ping"])

    async def queue_depth(
        self, job_statuses: Sequence[str]
    ) -> tuple[dict[str, int], dict[str, int]]:
        """Tasks by status (PENDING, IN_PROGRESS) and jobs by the given statuses."""
        tasks: dict[str, int] = {}
        jobs: dict[str, int] = {}
        for row in await self.pool.fetch(*Q.bind("queue_depth", job_statuses=list(job_statuses))):
            (tasks if row["relation"] == "tasks" else jobs)[row["status"]] = row["n"]
        return tasks, jobs

    # ------------------------------------------------------------ retention

    async def prune(
        self, retention: float, *, jobs_per_batch: int = 100, tasks_per_batch: int = 5000
    ) -> tuple[int, int]:
        """Delete finished jobs older than ``retention`` seconds and their tasks, in
        batches small enough never to hold up the workers. Returns (jobs, tasks)."""
        jobs_deleted = tasks_deleted = 0
        while True:
            prunable = await self.pool.fetch(
                *Q.bind("prunable_jobs", retention_seconds=retention, limit=jobs_per_batch)
            )
            ids = [r["id"] for r in prunable]
            if not ids:
                return jobs_deleted, tasks_deleted
            while True:
                status = await self.pool.execute(
                    *Q.bind(
                        "prune_tasks",
                        job_ids=ids,
                        retention_seconds=retention,
                        batch=tasks_per_batch,
                    )
                )
                deleted = int(status.split()[-1])
                tasks_deleted += deleted
                if deleted < tasks_per_batch:
                    break
            status = await self.pool.execute(
                *Q.bind("prune_jobs", job_ids=ids, retention_seconds=retention)
            )
            deleted = int(status.split()[-1])
            jobs_deleted += deleted
            if not deleted:  # all of them restarted meanwhile: try again next time
                return jobs_deleted, tasks_deleted
