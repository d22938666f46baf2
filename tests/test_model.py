"""Model-based test: random sequences of submissions, preparations, claims, outcomes,
crashes, stale workers, controls, the kinds a daemon serves and fleet-wide limits against a
real database, with the state machine's invariants checked from the database after every
step.

The test plays the daemon itself, one store call per step, so Hypothesis controls every
interleaving the real daemons could produce between two statements.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from herder import db
from herder.preparation import Batch, OrderedWriter
from herder.sql import QUERIES as Q
from herder.states import JOB_FINISHED, JOB_RUNS_TASKS, TASK_ACTIVE, JobStatus, TaskCounts, settle
from herder.store import ClaimedTask, Outcome, PreparationClaim, Store

T = TypeVar("T")
WORKER = "model-worker"
OUTCOMES = ("SUCCESS", "WARNING", "FAILURE", "CANCELED", "PENDING")
CONTROLS = ("cancel", "resume", "retry", "restart", "verify")
KINDS = ("synthetic", "other")
#: The kinds a daemon may serve: claims must never bring another's.
SERVED = (["synthetic"], ["other"], ["synthetic", "other"])


@dataclass
class Env:
    loop: asyncio.AbstractEventLoop
    store: Store

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)


async def write_batch(
    store: Store, job: PreparationClaim, rows: list[tuple[int, int, bytes]], *, last: bool
) -> bool:
    """One batch of the job's preparation, from where it stands (the last: the job PENDING)."""
    batch = Batch(rows, job.prepared, last=last, previous=None)
    return await OrderedWriter(store, WORKER, 30, job, max_attempts=3).write(batch)


class HerderModel(RuleBasedStateMachine):
    env: Env

    def __init__(self) -> None:
        super().__init__()
        self.run = self.env.run
        self.store = self.env.store
        self.run(
            self.store.pool.execute(
                "TRUNCATE herder.jobs, herder.tasks, herder.finish_hooks, herder.job_counts, "
                "herder.job_count_deltas, herder.kinds"
            )
        )
        self.held: dict[int, ClaimedTask] = {}
        self.stale: list[ClaimedTask] = []  # held by a worker that "died"
        self.half_prepared: list[tuple[PreparationClaim, int]] = []
        self.max_attempts_seen: dict[int, int] = {}

    # ------------------------------------------------------------ the world

    @rule(
        tasks=st.integers(0, 4),
        unverified=st.booleans(),
        priority=st.integers(0, 2),
        kind=st.sampled_from(KINDS),
    )
    def submit(self, tasks: int, unverified: bool, priority: int, kind: str) -> None:
        self.run(
            self.store.submit(kind, {"tasks": tasks}, priority=priority, unverified=unverified)
        )

    @rule(kind=st.sampled_from(KINDS), limit=st.sampled_from([None, 0, 1, 2]))
    def set_limit(self, kind: str, limit: int | None) -> None:
        """An operator sets (or lifts) a kind's fleet-wide limit."""
        self.run(
            self.store.pool.execute(
                "INSERT INTO herder.kinds (name, max_running) VALUES ($1, $2) "
                "ON CONFLICT (name) DO UPDATE SET max_running = excluded.max_running",
                kind,
                limit,
            )
        )

    @rule(split=st.booleans(), served=st.sampled_from(SERVED))
    def prepare(self, split: bool, served: list[str]) -> None:
        """Claim a PREPARING job of a kind this daemon serves; write all its tasks, or
        only the first ones (a coordinator that will die before finishing)."""
        claimed = self.run(self.store.claim_preparations(WORKER, 30, 1, served))
        if not claimed:
            return
        [job] = claimed
        assert job.kind in served, (job.kind, served)
        if job.stale_tasks:
            self.run(self.store.discard_stale_tasks(job.id, batch=2))
        total = job.payload["tasks"]
        rows = [(job.id, seq, db.encode_json({"i": seq})) for seq in range(job.prepared, total)]
        if split and len(rows) > 1:
            first = rows[: len(rows) // 2]
            if self.run(write_batch(self.store, job, first, last=False)):
                self.half_prepared.append((job, job.prepared + len(first)))
            return
        written = self.run(write_batch(self.store, job, rows, last=True))
        if written and total == 0:
            self.run(self.store.settle_jobs([job.id]))

    @precondition(lambda self: self.half_prepared)
    @rule()
    def coordinator_dies(self) -> None:
        """Its lease runs out; another coordinator will resume from `prepared`."""
        job, _ = self.half_prepared.pop()
        self.run(
            self.store.pool.execute(
                "UPDATE herder.jobs SET prepare_lease_until = clock_timestamp() "
                "- interval '1 s' WHERE id = $1 AND preparer = $2",
                job.id,
                WORKER,
            )
        )

    @rule(limit=st.integers(1, 5), served=st.sampled_from(SERVED))
    def claim(self, limit: int, served: list[str]) -> None:
        """A claim brings tasks of the served kinds only, and never takes a limited kind
        past its limit (what runs already, prefetched tasks included, counts)."""
        room = {
            r["name"]: r["room"]
            for r in self.run(
                self.store.pool.fetch(
                    "SELECT k.name, k.max_running - (SELECT count(*) FROM herder.tasks t "
                    "JOIN herder.jobs j ON j.id = t.job_id WHERE t.status = 'IN_PROGRESS' "
                    "AND j.kind = k.name) AS room FROM herder.kinds k "
                    "WHERE k.max_running IS NOT NULL"
                )
            )
        }
        claimed = self.run(self.store.claim_tasks(limit, WORKER, 30, served))
        for kind in KINDS:
            taken = sum(1 for t in claimed if t.kind == kind)
            assert kind in served or taken == 0, (kind, served)
            if kind in room:
                assert taken <= max(0, room[kind]), (kind, taken, room[kind])
        for task in claimed:
            assert task.id not in self.held
            self.held[task.id] = task
        starting = sorted({t.job_id for t in self.held.values() if t.job_status == "PENDING"})
        if starting:
            self.run(self.store.start_jobs(starting))

    @precondition(lambda self: self.held)
    @rule(data=st.data(), status=st.sampled_from(OUTCOMES), quiet=st.booleans())
    def finish(self, data: st.DataObject, status: str, quiet: bool) -> None:
        """quiet: no message (a plain SUCCESS is written by its own query)."""
        task_id = data.draw(st.sampled_from(sorted(self.held)))
        task = self.held.pop(task_id)
        message = None if quiet else f"model {status}"
        outcome = Outcome(task.id, task.job_id, task.attempts, status, message)
        applied = self.run(self.store.complete_tasks([outcome]))
        if applied:
            self.run(self.store.settle_jobs([task.job_id]))

    @precondition(lambda self: self.stale)
    @rule(status=st.sampled_from(OUTCOMES), quiet=st.booleans())
    def stale_worker_finishes(self, status: str, quiet: bool) -> None:
        """A worker that lost its lease reports late: nothing may change."""
        task = self.stale.pop()
        outcome = Outcome(task.id, task.job_id, task.attempts, status, None if quiet else "late")
        before = self.run(
            self.store.pool.fetchrow("SELECT * FROM herder.tasks WHERE id = $1", task.id)
        )
        assert (
            self.run(self.store.complete_tasks([outcome])) == []
            or before is None
            or (before["status"] == "IN_PROGRESS" and before["attempts"] == task.attempts)
        )

    @rule()
    def worker_dies(self) -> None:
        """Every lease runs out at once and the rescue runs."""
        self.stale.extend(self.held.values())
        self.held.clear()
        self.run(
            self.store.pool.execute(
                "UPDATE herder.tasks SET lease_until = clock_timestamp() - interval '1 s' "
                "WHERE status = 'IN_PROGRESS'"
            )
        )
        self.run(self.store.rescue_expired_tasks("model-sweeper"))

    @rule(data=st.data(), action=st.sampled_from(CONTROLS))
    def control(self, data: st.DataObject, action: str) -> None:
        ids = self.run(self.store.pool.fetch("SELECT id FROM herder.jobs ORDER BY id"))
        if not ids:
            return
        job_id = data.draw(st.sampled_from([r["id"] for r in ids]))
        self.run(self.store.control(action, job_id))

    @rule()
    def cancellation_reaches_running_tasks(self) -> None:
        stopped = self.run(self.store.jobs_not_running(t.job_id for t in self.held.values()))
        for task in [t for t in self.held.values() if t.job_id in stopped]:
            del self.held[task.id]
            outcome = Outcome(task.id, task.job_id, task.attempts, "CANCELED", "canceled")
            self.run(self.store.complete_tasks([outcome]))
        self.run(self.store.settle_jobs(stopped))

    @rule(window=st.integers(1, 3))
    def reopen_a_little(self, window: int) -> None:
        """One window of each resumed or retried job reopened (the daemon does them all)."""
        for job in self.run(self.store.pool.fetch(*Q.bind("reopening_jobs", limit=10))):
            self.run(
                self.store.pool.fetchrow(
                    *Q.bind(
                        "reopen_batch",
                        job_id=job["id"],
                        reopen_from=job["reopen_from"],
                        window=window,
                        reopening=job["reopening"],
                    )
                )
            )

    @rule(batch=st.integers(1, 4))
    def fold_counts(self, batch: int) -> None:
        self.run(self.store.fold_counts(batch))

    @rule()
    def sweep(self) -> None:
        """The daemon's periodic safety net. Afterwards no job may be stuck: every job
        still PENDING, IN_PROGRESS or CANCELING has a task that is pending or running."""
        self.run(self.store.reopen_tasks(window=2))
        for job_id in self.run(self.store.stale_jobs()):
            self.run(self.store.discard_stale_tasks(job_id, batch=2))
        self.run(self.store.settle_jobs(None))
        stuck = self.run(
            self.store.pool.fetch(
                "SELECT j.id, j.status FROM herder.jobs j "
                "WHERE j.status = ANY($1::text[]) AND NOT EXISTS ("
                "  SELECT 1 FROM herder.tasks t WHERE t.job_id = j.id"
                "  AND t.status = ANY($2::text[]))",
                sorted(JOB_RUNS_TASKS),
                sorted(TASK_ACTIVE),
            )
        )
        assert stuck == [], f"jobs that can never settle: {stuck}"

    # ------------------------------------------------------------ invariants

    @invariant()
    def tasks_run_only_under_a_running_job(self) -> None:
        bad = self.run(
            self.store.pool.fetch(
                "SELECT t.id, j.status FROM herder.tasks t JOIN herder.jobs j ON j.id = t.job_id "
                "WHERE t.status = 'IN_PROGRESS' AND j.status <> ALL($1::text[])",
                sorted(JOB_RUNS_TASKS),
            )
        )
        assert bad == [], bad

    @invariant()
    def finished_jobs_are_settled_consistently(self) -> None:
        rows = self.run(
            self.store.pool.fetch(
                "SELECT j.id, j.status, j.ended_at, p.pending, p.in_progress, p.success, "
                "p.warning, p.failure, p.canceled "
                "FROM herder.jobs j JOIN herder.job_progress p ON p.job_id = j.id"
            )
        )
        for row in rows:
            status = JobStatus(row["status"])
            counts = TaskCounts(
                row["pending"],
                row["in_progress"],
                row["success"],
                row["warning"],
                row["failure"],
                row["canceled"],
            )
            if status in JOB_FINISHED:
                assert row["ended_at"] is not None, row
                assert counts.active == 0, row
                if status is not JobStatus.CANCELED:
                    expected = settle(JobStatus.IN_PROGRESS, counts)
                    assert expected is not None and expected.status is status, row
            else:
                assert row["ended_at"] is None, row

    @invariant()
    def counts_equal_a_recount(self) -> None:
        """The per-job counts kept with the writes equal counting the tasks."""
        rows = self.run(
            self.store.pool.fetch(
                "SELECT j.id, (SELECT row(c.*)::text FROM herder.task_counts(j.id) c) AS kept,"
                " (SELECT row(count(*) FILTER (WHERE t.status = 'PENDING'),"
                "  count(*) FILTER (WHERE t.status = 'IN_PROGRESS'),"
                "  count(*) FILTER (WHERE t.status = 'SUCCESS'),"
                "  count(*) FILTER (WHERE t.status = 'WARNING'),"
                "  count(*) FILTER (WHERE t.status = 'FAILURE'),"
                "  count(*) FILTER (WHERE t.status = 'CANCELED'))::text"
                "  FROM herder.tasks t WHERE t.job_id = j.id) AS recount "
                "FROM herder.jobs j"
            )
        )
        wrong = [dict(r) for r in rows if r["kept"] != r["recount"]]
        assert wrong == [], wrong

    @invariant()
    def attempts_never_go_back_and_leases_match_status(self) -> None:
        rows = self.run(
            self.store.pool.fetch(
                "SELECT id, status, attempts, worker, lease_until FROM herder.tasks"
            )
        )
        for row in rows:
            seen = self.max_attempts_seen.get(row["id"], 0)
            assert row["attempts"] >= seen, row
            self.max_attempts_seen[row["id"]] = row["attempts"]
            running = row["status"] == "IN_PROGRESS"
            assert running == (row["worker"] is not None) == (row["lease_until"] is not None), row


def test_state_machine_invariants_hold_under_random_histories(db_url: str) -> None:
    loop = asyncio.new_event_loop()
    pool = loop.run_until_complete(db.create_pool(db_url, min_size=1, max_size=2))
    HerderModel.env = Env(loop, Store(pool))
    try:
        HerderModel.TestCase.settings = settings(
            max_examples=40,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        HerderModel.TestCase().runTest()
    finally:
        loop.run_until_complete(pool.close())
        loop.close()
