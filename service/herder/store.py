"""The database behind one interface: every read and write herder makes, as methods.

Coordinator, worker, CLI and tests go through ``Store``; none of them writes SQL. The
queries themselves live in ``sql/queries.sql``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from herder.db import Pool, PoolConnection, storable_text
from herder.kinds import runs_finish_hook
from herder.sql import QUERIES as Q
from herder.states import JOB_HOOKED, JobStatus, Settlement, TaskCounts, settle

#: A job with no counts row and no deltas: it prepared no task.
NO_TASKS = TaskCounts()
CONTROL_ACTIONS = ("cancel", "resume", "retry", "restart", "verify")
#: Rows one statement of a batched control touches: small enough that no statement holds
#: locks for long, big enough that a million-task job takes a few hundred statements.
CANCEL_BATCH = 5000
REOPEN_WINDOW = 5000
DISCARD_BATCH = 5000
FOLD_BATCH = 10_000
#: Jobs locked and settled by one transaction.
SETTLE_BATCH = 500
#: Characters kept of a task's or job's message, and of a traceback.
MESSAGE_LIMIT = 10_000
TRACEBACK_LIMIT = 100_000


@dataclass(frozen=True, slots=True)
class PreparationClaim:
    id: int
    kind: str
    payload: Any
    priority: int
    owner: str
    #: Names this preparation attempt: every write it makes is fenced by it.
    generation: int
    prepared: int
    #: Tasks of an earlier run still to delete before this preparation writes any.
    stale_tasks: int
    #: herder.settings max_tasks_per_job when the job was claimed.
    max_tasks: int

    @property
    def key(self) -> tuple[int, int]:
        return (self.id, self.generation)


@dataclass(frozen=True, slots=True)
class SmallPreparation:
    """A whole preparation that fits one batch, committed with others (see
    write_small_preparations)."""

    claim: PreparationClaim
    rows: Sequence[tuple[int, int, bytes]]
    max_attempts: int


@dataclass(frozen=True, slots=True)
class CopyModes:
    """How the daemon's role may load tasks (see preparation.py)."""

    #: COPY FROM is allowed.
    copy: bool
    #: The foreign key's per-row checks may be skipped.
    unchecked: bool


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


class Store:
    def __init__(
        self, pool: Pool, app_pool: Pool | None = None, *, unchecked_copy: bool | None = None
    ) -> None:
        """``unchecked_copy``: load batches and small preparations with the foreign key's
        per-row checks off (see preparation.py). None: whenever the database role may; False:
        never."""
        self.pool = pool
        #: The pool kinds' code gets (JobContext.pool, TaskContext.pool): its sessions are
        #: reset between uses, so nothing a kind sets can leak into herder's queries.
        self.app_pool = app_pool or pool
        self._unchecked_copy = unchecked_copy
        self._copy_modes: CopyModes | None = None

    # ------------------------------------------------------------ preparation

    async def claim_preparations(
        self, preparer: str, lease: float, limit: int = 1
    ) -> list[PreparationClaim]:
        """Up to ``limit`` PREPARING jobs nobody holds, in priority order."""
        rows = await self.pool.fetch(
            *Q.bind("claim_preparations", preparer=preparer, lease_seconds=lease, limit=limit)
        )
        claims = [PreparationClaim(**dict(r)) for r in rows]
        claims.sort(key=lambda c: (-c.priority, c.id))
        return claims

    async def copy_modes(self) -> CopyModes:
        """How this daemon's role may load tasks; read on first use."""
        if self._copy_modes is None:
            row = await self.pool.fetchrow(Q["copy_modes"])
            assert row is not None
            unchecked = bool(row["unchecked"]) and self._unchecked_copy is not False
            self._copy_modes = CopyModes(copy=bool(row["copy"]), unchecked=unchecked)
        return self._copy_modes

    async def skip_row_triggers(self, conn: PoolConnection) -> None:
        await conn.execute(Q["skip_row_triggers"])

    async def fire_row_triggers(self, conn: PoolConnection) -> None:
        await conn.execute(Q["fire_row_triggers"])

    async def copy_tasks(self, conn: PoolConnection, rows: Sequence[tuple[int, int, Any]]) -> None:
        """Load (job_id, seq, payload) rows by COPY. Nothing fences them: only a fenced
        write in the same transaction (write_batch, write_last_batch) may commit them."""
        await conn.copy_records_to_table(
            "tasks", schema_name="herder", columns=("job_id", "seq", "payload"), records=rows
        )

    async def write_batch(
        self,
        conn: PoolConnection,
        job: PreparationClaim,
        preparer: str,
        rows: Sequence[tuple[int, int, Any]],
        *,
        prepared_before: int,
        prepared_after: int,
        lease: float,
    ) -> bool:
        """Commit (job_id, seq, payload) rows (none: COPY loaded them in this transaction)
        and move ``jobs.prepared`` from ``prepared_before`` to ``prepared_after``, renewing
        the lease. False, writing nothing, when this preparation no longer holds the job
        (canceled, restarted, taken over) or ``prepared`` is not ``prepared_before``."""
        written = await conn.fetchval(
            *Q.bind(
                "write_batch",
                job_id=job.id,
                generation=job.generation,
                preparer=preparer,
                seqs=[r[1] for r in rows],
                payloads=[r[2] for r in rows],
                prepared_before=prepared_before,
                prepared_after=prepared_after,
                lease_seconds=lease,
            )
        )
        return written is not None

    async def write_last_batch(
        self,
        conn: PoolConnection,
        job: PreparationClaim,
        preparer: str,
        rows: Sequence[tuple[int, int, Any]],
        *,
        prepared_before: int,
        prepared_after: int,
        max_attempts: int,
    ) -> bool:
        """write_batch for the last batch: it also commits the job PENDING, its tasks
        allowed ``max_attempts`` each."""
        written = await conn.fetchval(
            *Q.bind(
                "write_last_batch",
                job_id=job.id,
                generation=job.generation,
                preparer=preparer,
                seqs=[r[1] for r in rows],
                payloads=[r[2] for r in rows],
                prepared_before=prepared_before,
                prepared_after=prepared_after,
                max_attempts=max_attempts,
            )
        )
        return written is not None

    async def write_small_preparations(
        self, conn: PoolConnection, jobs: Sequence[SmallPreparation], preparer: str
    ) -> set[int]:
        """Commit whole preparations, each job's tasks and its PENDING status, in one
        statement; returns the ids of the jobs written (the others are no longer held by
        these preparations)."""
        task_job_ids, seqs, payloads = [], [], []
        for job in jobs:
            for job_id, seq, payload in job.rows:
                task_job_ids.append(job_id)
                seqs.append(seq)
                payloads.append(payload)
        rows = await conn.fetch(
            *Q.bind(
                "write_small_preparations",
                job_ids=[j.claim.id for j in jobs],
                generations=[j.claim.generation for j in jobs],
                max_attempts=[j.max_attempts for j in jobs],
                task_counts=[len(j.rows) for j in jobs],
                preparer=preparer,
                task_job_ids=task_job_ids,
                seqs=seqs,
                payloads=payloads,
            )
        )
        return {r["id"] for r in rows}

    async def fail_preparation(
        self, job: PreparationClaim, preparer: str, message: str, *, run_hook: bool
    ) -> bool:
        """Fail the job, if this preparation still holds it; True when it applied."""
        row = await self.pool.fetchrow(
            *Q.bind(
                "fail_preparation",
                job_id=job.id,
                generation=job.generation,
                preparer=preparer,
                message=storable_text(message, MESSAGE_LIMIT),
                run_hook=run_hook,
            )
        )
        return row is not None

    async def discard_stale_tasks(self, job_id: int, batch: int = DISCARD_BATCH) -> int:
        """Delete an earlier run's tasks of ``job_id``, one window of seqs per statement;
        returns how many windows this call deleted."""
        windows = 0
        while True:
            stale = await self.pool.fetchval(*Q.bind("stale_tasks", job_id=job_id))
            if not stale:
                return windows
            discarded = await self.pool.fetchval(
                *Q.bind("discard_stale_batch", job_id=job_id, stale_tasks=stale, window=batch)
            )
            if discarded is not None:
                windows += 1

    async def stale_jobs(self, limit: int = 100) -> list[int]:
        return [r["id"] for r in await self.pool.fetch(*Q.bind("stale_jobs", limit=limit))]

    async def release_preparation(self, job: PreparationClaim, preparer: str) -> None:
        await self.pool.execute(
            *Q.bind(
                "release_preparation", job_id=job.id, generation=job.generation, preparer=preparer
            )
        )

    async def renew_preparations(
        self, held: Iterable[tuple[int, int]], preparer: str, lease: float
    ) -> set[tuple[int, int]]:
        """Renew (job id, generation) leases; return those renewed."""
        ids, generations = _columns(held)
        if not ids:
            return set()
        rows = await self.pool.fetch(
            *Q.bind(
                "renew_preparations",
                job_ids=ids,
                generations=generations,
                preparer=preparer,
                lease_seconds=lease,
            )
        )
        return {(r["id"], r["generation"]) for r in rows}

    async def preparations_lost(
        self, held: Iterable[tuple[int, int]], preparer: str
    ) -> set[tuple[int, int]]:
        """Of the (job id, generation) held, those this preparer must stop."""
        ids, generations = _columns(held)
        if not ids:
            return set()
        rows = await self.pool.fetch(
            *Q.bind("preparations_lost", job_ids=ids, generations=generations, preparer=preparer)
        )
        return {(r["id"], r["generation"]) for r in rows}

    # ------------------------------------------------------------ tasks

    async def claim_tasks(self, limit: int, worker: str, lease: float) -> list[ClaimedTask]:
        rows = await self.pool.fetch(
            *Q.bind("claim_tasks", batch=limit, worker=worker, lease_seconds=lease)
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
                    messages=[_storable(o.message, MESSAGE_LIMIT) for o in detailed],
                    results=[o.result_json for o in detailed],
                    tracebacks=[_storable(o.traceback, TRACEBACK_LIMIT) for o in detailed],
                    delays=[o.delay for o in detailed],
                )
            )
        return [(r["id"], r["job_id"]) for r in rows]

    async def release_tasks(self, held: Iterable[tuple[int, int]], worker: str) -> int:
        """Hand (task_id, attempt) back to PENDING without spending the attempt."""
        ids, attempts = _columns(held)
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
        ids, attempts = _columns(held)
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

    # ------------------------------------------------------------ settlement

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

    # ------------------------------------------------------------ control and reading

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


def _storable(text: str | None, limit: int) -> str | None:
    return None if text is None else storable_text(text, limit)


def _columns(pairs: Iterable[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """(id, n) pairs as the two arrays a query unnests."""
    firsts: list[int] = []
    seconds: list[int] = []
    for first, second in pairs:
        firsts.append(first)
        seconds.append(second)
    return firsts, seconds
