"""Statements of settlement: what must happen before a job can settle (its pending tasks
canceled, its reopened tasks back to PENDING), settling it once, folding the counts it is
read from, and the on_finished hooks that follow."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from herder.db import Pool
from herder.kinds import runs_finish_hook
from herder.sql import QUERIES as Q
from herder.states import JOB_HOOKED, JobStatus, Settlement, TaskCounts, settle

#: A job with no counts row and no deltas: it prepared no task.
NO_TASKS = TaskCounts()
#: Rows one statement of a batched control touches: small enough that no statement holds
#: locks for long, big enough that a million-task job takes a few hundred statements.
CANCEL_BATCH = 5000
REOPEN_WINDOW = 5000
FOLD_BATCH = 10_000
#: Jobs locked and settled by one transaction.
SETTLE_BATCH = 500


@dataclass(frozen=True, slots=True)
class SettledJob:
    id: int
    kind: str
    settlement: Settlement


@dataclass(frozen=True, slots=True)
class FinishHookClaim:
    """One run of an on_finished hook: (hook_id, attempts) fences it."""

    hook_id: int
    attempts: int
    id: int
    kind: str
    payload: Any
    status: str
    message: str | None
    owner: str


class SettlementStatements:
    pool: Pool

    async def settle_jobs(self, job_ids: Iterable[int] | None = None) -> list[SettledJob]:
        """Settle every given job (every job, with None) that can settle now.

        The candidate query takes no lock. Only a job that looks finished is locked, and
        its counts are read under that lock, so two workers finishing a job's last two
        tasks at once settle it exactly once.
        """
        ids = None if job_ids is None else sorted(set(job_ids))
        if ids == []:
            return []
        candidates = []
        for row in await self.pool.fetch(*Q.bind("settle_candidates", job_ids=ids)):
            if row["status"] == JobStatus.CANCELING:
                await self.cancel_pending_tasks(row["id"])
            candidates.append(row["id"])
        settled: list[SettledJob] = []
        for start in range(0, len(candidates), SETTLE_BATCH):
            settled += await self._settle_batch(candidates[start : start + SETTLE_BATCH])
        return settled

    async def cancel_pending_tasks(self, job_id: int, batch: int = CANCEL_BATCH) -> int:
        """Cancel a CANCELING job's pending tasks, a batch per statement."""
        canceled = 0
        while True:
            status = await self.pool.execute(
                *Q.bind("cancel_pending_batch", job_id=job_id, batch=batch)
            )
            done = int(status.split()[-1])
            canceled += done
            if done < batch:
                return canceled

    async def reopen_tasks(self, window: int = REOPEN_WINDOW, jobs: int = 100) -> int:
        """Walk every resumed or retried job's tasks back to PENDING, one window of seqs
        per statement; returns how many tasks were reopened."""
        reopened = 0
        for job in await self.pool.fetch(*Q.bind("reopening_jobs", limit=jobs)):
            start = job["reopen_from"]
            while True:
                row = await self.pool.fetchrow(
                    *Q.bind(
                        "reopen_batch",
                        job_id=job["id"],
                        reopen_from=start,
                        window=window,
                        reopening=job["reopening"],
                    )
                )
                if row is None:  # another daemon moved the window on, or the job moved
                    break
                reopened += row["reopened"]
                if row["done"]:
                    break
                start += window
        return reopened

    async def _settle_batch(self, job_ids: list[int]) -> list[SettledJob]:
        """Lock the jobs, read their counts, and settle those that can: four round trips
        for the whole batch (a job is locked only when it looked finished)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(Q["prefer_indexes"])
            locked = await conn.fetch(*Q.bind("lock_for_settlement", job_ids=job_ids))
            if not locked:
                return []
            counts = {
                r["id"]: TaskCounts(*list(r.values())[1:])
                for r in await conn.fetch(*Q.bind("task_counts", job_ids=[r["id"] for r in locked]))
            }
            settled = []
            for row in locked:
                settlement = settle(JobStatus(row["status"]), counts.get(row["id"], NO_TASKS))
                if settlement is not None:
                    settled.append(SettledJob(row["id"], row["kind"], settlement))
            if settled:
                announced = [s.settlement.status in JOB_HOOKED for s in settled]
                await conn.execute(
                    *Q.bind(
                        "apply_settlements",
                        job_ids=[s.id for s in settled],
                        statuses=[s.settlement.status.value for s in settled],
                        messages=[s.settlement.message for s in settled],
                        hooked=[
                            a and runs_finish_hook(s.kind)
                            for a, s in zip(announced, settled, strict=True)
                        ],
                        announced=announced,
                    )
                )
        return settled

    async def fold_counts(self, batch: int = FOLD_BATCH) -> int:
        """Fold per-job count deltas into job_counts, a batch per transaction, unless
        another daemon is folding; returns how many deltas were folded."""
        folded = 0
        while True:
            async with self.pool.acquire() as conn, conn.transaction():
                if not await conn.fetchval(Q["fold_counts_lock"]):
                    return folded
                done: int = await conn.fetchval(*Q.bind("fold_counts", batch=batch))
            folded += done
            if done < batch:
                return folded

    async def claim_finish_hook(
        self, kinds: list[str], lease: float, runner: str
    ) -> FinishHookClaim | None:
        row = await self.pool.fetchrow(
            *Q.bind("claim_finish_hook", kinds=kinds, lease_seconds=lease, runner=runner)
        )
        return None if row is None else FinishHookClaim(**dict(row))

    async def renew_finish_hook(self, hook: FinishHookClaim, runner: str, lease: float) -> bool:
        row = await self.pool.fetchrow(
            *Q.bind(
                "renew_finish_hook",
                hook_id=hook.hook_id,
                attempts=hook.attempts,
                runner=runner,
                lease_seconds=lease,
            )
        )
        return row is not None

    async def finish_hook_done(self, hook: FinishHookClaim) -> None:
        await self.pool.execute(
            *Q.bind("finish_hook_done", hook_id=hook.hook_id, attempts=hook.attempts)
        )
