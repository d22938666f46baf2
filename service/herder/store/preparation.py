"""Statements of preparation: claiming PREPARING jobs, writing their tasks (composed into
batches by herder.preparation), failing, releasing and renewing them, and deleting an
earlier run's tasks."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from herder.db import Pool, PoolConnection, storable_text
from herder.sql import QUERIES as Q
from herder.store.arguments import MESSAGE_LIMIT, columns

#: Tasks of an earlier run one statement deletes: small enough that no statement holds
#: locks for long, big enough that a million-task job takes a few hundred statements.
DISCARD_BATCH = 5000


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
    """How the daemon's role may load tasks (see herder.preparation)."""

    #: COPY FROM is allowed.
    copy: bool
    #: The foreign key's per-row checks may be skipped.
    unchecked: bool


class PreparationStatements:
    pool: Pool
    _unchecked_copy: bool | None
    _copy_modes: CopyModes | None

    async def claim_preparations(
        self, preparer: str, lease: float, limit: int = 1, kinds: list[str] | None = None
    ) -> list[PreparationClaim]:
        """Up to ``limit`` PREPARING jobs nobody holds, of ``kinds`` (None: any), in
        priority order."""
        rows = await self.pool.fetch(
            *Q.bind(
                "claim_preparations",
                preparer=preparer,
                lease_seconds=lease,
                limit=limit,
                kinds=kinds,
            )
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
        batch = _batch_arguments(job, preparer, rows, prepared_before, prepared_after)
        written = await conn.fetchval(*Q.bind("write_batch", **batch, lease_seconds=lease))
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
        batch = _batch_arguments(job, preparer, rows, prepared_before, prepared_after)
        written = await conn.fetchval(
            *Q.bind("write_last_batch", **batch, max_attempts=max_attempts)
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
        ids, generations = columns(held)
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
        ids, generations = columns(held)
        if not ids:
            return set()
        rows = await self.pool.fetch(
            *Q.bind("preparations_lost", job_ids=ids, generations=generations, preparer=preparer)
        )
        return {(r["id"], r["generation"]) for r in rows}


def _batch_arguments(
    job: PreparationClaim,
    preparer: str,
    rows: Sequence[tuple[int, int, Any]],
    prepared_before: int,
    prepared_after: int,
) -> dict[str, Any]:
    """What write_batch and write_last_batch both take."""
    return {
        "job_id": job.id,
        "generation": job.generation,
        "preparer": preparer,
        "seqs": [r[1] for r in rows],
        "payloads": [r[2] for r in rows],
        "prepared_before": prepared_before,
        "prepared_after": prepared_after,
    }
