"""Prometheus metrics of one daemon, in a registry of its own (tests run several daemons
in one process). Hot paths record in batches: the completer observes a whole batch of
outcomes at once, the claimer one claim at a time."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from herder.store import SettledJob

log = structlog.get_logger("herder")

# Task durations from no-op (microseconds) to long batch work (minutes).
DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
    120, 300, 600,
)  # fmt: skip
# Commit-to-start latency: the target is milliseconds; minutes mean a backlog.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.tasks_finished = Counter(
            "herder_tasks_finished",
            "Task attempts finished, by kind and the status they ended in "
            "(PENDING: failed and will be retried)",
            ["kind", "status"],
            registry=r,
        )
        self.task_duration = Histogram(
            "herder_task_duration_seconds",
            "Time a task attempt spent in its handler",
            ["kind"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.start_latency = Histogram(
            "herder_job_start_latency_seconds",
            "From a job's commit (created_at) to the start of its first task",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.jobs_settled = Counter(
            "herder_jobs_settled",
            "Jobs this daemon settled, by kind and final status",
            ["kind", "status"],
            registry=r,
        )
        self.claims = Counter("herder_claims", "Claim statements that returned tasks", registry=r)
        self.claim_batch = Histogram(
            "herder_claim_batch_size",
            "Tasks per successful claim",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.completion_batch = Histogram(
            "herder_completion_batch_size",
            "Outcomes written per completion statement",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.tasks_prepared = Counter(
            "herder_tasks_prepared", "Tasks written by preparation, by kind", ["kind"], registry=r
        )
        self.tasks_rescued = Counter(
            "herder_tasks_rescued",
            "Tasks of lost workers (lease expired) handed back or failed by this daemon",
            registry=r,
        )
        self.running = Gauge("herder_tasks_running", "Tasks in a handler now", registry=r)
        self.jobs_unserved = Gauge(
            "herder_jobs_unserved",
            "PREPARING jobs of a kind no live daemon serves (as of this daemon's last sweep)",
            registry=r,
        )
        self._durations: dict[str, Histogram] = {}

    def claimed(self, tasks: int) -> None:
        self.claims.inc()
        self.claim_batch.observe(tasks)

    def finished(self, outcomes: Iterable[tuple[str, str, float]]) -> int:
        """Record (kind, status, seconds) of a batch of outcomes; returns how many."""
        counts: dict[tuple[str, str], int] = {}
        n = 0
        for kind, status, seconds in outcomes:
            counts[kind, status] = counts.get((kind, status), 0) + 1
            durations = self._durations.get(kind)
            if durations is None:
                durations = self._durations[kind] = self.task_duration.labels(kind)
            durations.observe(seconds)
            n += 1
        for (kind, status), count in counts.items():
            self.tasks_finished.labels(kind, status).inc(count)
        self.completion_batch.observe(n)
        return n

    def settled(self, jobs: Iterable[SettledJob]) -> None:
        for job in jobs:
            status = job.settlement.status.value
            self.jobs_settled.labels(job.kind, status).inc()
            log.info(
                "job settled",
                job_id=job.id,
                kind=job.kind,
                status=status,
                message=job.settlement.message,
            )
