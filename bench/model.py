"""What the benchmark measures, as plain dataclasses (they become results.json)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Throughput:
    """No-op tasks through one system: rate from the first start to the last end (the
    systems' own timestamps), and the wall time from submission to settlement."""

    system: str
    tasks: int
    concurrency: int
    workers: int
    run_seconds: float
    rate: float
    wall_seconds: float
    wall_rate: float
    prepare_seconds: float | None = None
    worker_cpu_seconds: float = 0.0
    worker_cores: float = 0.0  # worker CPU seconds per second of the run
    machine_cpu_busy: float = 0.0  # share of all cores busy during the run, 0..1
    server_cores: float | None = None  # PostgreSQL's CPU seconds per second of the run
    bench_cores: float = 0.0  # the measuring process's own CPU (deferring, polling)
    problems: list[str] = field(default_factory=list)


@dataclass
class Latency:
    """Commit-to-start latency of single-task jobs inserted one by one on an idle worker."""

    system: str
    samples: int
    interval_seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    # herder only: how much of it is preparation (job commit -> job PENDING)
    prepare_p50_ms: float | None = None
    problems: list[str] = field(default_factory=list)

    @classmethod
    def of(
        cls,
        system: str,
        values: list[float],
        interval_seconds: float,
        problems: list[str],
        prepare_p50_ms: float | None = None,
    ) -> Latency:
        """Summarise the latencies (ms) of one system's samples."""
        return cls(
            system=system,
            samples=len(values),
            interval_seconds=interval_seconds,
            p50_ms=percentile(values, 50),
            p90_ms=percentile(values, 90),
            p99_ms=percentile(values, 99),
            max_ms=max(values, default=float("nan")),
            mean_ms=sum(values) / len(values) if values else float("nan"),
            prepare_p50_ms=prepare_p50_ms,
            problems=problems,
        )


@dataclass
class Prepare:
    """A big job from its INSERT's commit to PENDING (``prepared_at``)."""

    tasks: int
    seconds: float
    rate: float
    daemon_peak_rss_mb: float
    problems: list[str] = field(default_factory=list)


@dataclass
class Soak:
    """Many tasks through one daemon: the first window of them against the last."""

    tasks: int
    jobs: int
    window: int
    first_rate: float
    last_rate: float
    ratio: float  # last_rate / first_rate
    run_seconds: float
    rate: float
    daemon_peak_rss_mb: float
    timeline: list[tuple[float, float]] = field(default_factory=list)  # (t, tasks/s)
    # per job: seconds after the first task start when it was created, prepared, ...
    job_times: list[dict[str, float]] = field(default_factory=list)
    table: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


@dataclass
class History:
    """The same workloads on empty tables and after ``finished_tasks`` of history."""

    finished_tasks: int
    single_task_jobs: int
    single_rate_empty: float  # tasks (= jobs) per second
    single_rate_after: float
    one_job_rate_empty: float
    one_job_rate_after: float
    many_jobs: int
    many_jobs_rate_empty: float
    many_jobs_rate_after: float
    # the same workloads, tasks per second from submission to the last settlement
    one_job_settle_empty: float
    one_job_settle_after: float
    many_jobs_settle_empty: float
    many_jobs_settle_after: float
    show_ms_big_job: float  # median, the queries `herder show` runs
    show_ms_single_task_job: float
    per_job_plan: list[str] = field(default_factory=list)

    @property
    def single_ratio(self) -> float:
        return self.single_rate_after / self.single_rate_empty

    @property
    def spread_ratio(self) -> float:
        """Many small jobs against one big job, both after the history, first task
        start to last task end."""
        return self.many_jobs_rate_after / self.one_job_rate_after

    @property
    def spread_settle_ratio(self) -> float:
        """The same, submission to last settlement: each charged its preparation."""
        return self.many_jobs_settle_after / self.one_job_settle_after


@dataclass
class Sharing:
    """Many users on one service: see bench/sharing.py."""

    small_behind_big_s: float
    small_behind_preparations_s: float
    held_most: int = 0
    urgent_s: float = 0.0
    plain_sleep_s: float = 0.0
    mixed_fleet_jobs: int = 0
    mixed_fleet_failed: int = 0
    # one job of no-op tasks, tasks/s, fair sharing on and off (back to back)
    fair_rate: float = 0.0
    unfair_rate: float = 0.0

    @property
    def fairness_cost_ratio(self) -> float:
        return self.fair_rate / self.unfair_rate if self.unfair_rate else float("nan")


@dataclass
class ScaleOut:
    """Tasks of ``task_ms`` through one daemon, then through ``daemons`` daemons."""

    tasks: int
    task_ms: float
    daemons: int
    one: Throughput
    many: Throughput

    @property
    def ratio(self) -> float:
        return self.many.rate / self.one.rate if self.one.rate else 0.0


@dataclass
class Profile:
    """Where the time went during herder's throughput run (``--profile``)."""

    # py-spy on the daemon: leaf frames, and the innermost herder frame of each sample
    leaf_frames: list[tuple[str, float]] = field(default_factory=list)
    herder_frames: list[tuple[str, float]] = field(default_factory=list)
    # pg_stat_activity samples: (statement, wait event, mean active backends)
    db_statements: list[tuple[str, str, float]] = field(default_factory=list)
    db_samples: int = 0


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (0..100) of ``values``."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
