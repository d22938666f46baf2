"""The benchmark's knobs (``python -m bench --help``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Options:
    tasks: int = 100_000
    procrastinate_tasks: int = 5_000
    concurrency: int = 10
    prefetch: int | None = None  # herder's local queue bound; None: the daemon's default
    prepare_tasks: int = 1_000_000
    latency_samples: int = 200
    latency_interval: float = 0.05
    latency_warmup: int = 5
    skip_procrastinate: bool = False
    skip_herder: bool = False
    soak: int = 0
    soak_job_tasks: int = 500_000
    daemons: int = 0
    daemon_tasks: int = 30_000
    daemon_task_ms: float = 1.0
    history_tasks: int = 1_000_000
    history_single_jobs: int = 500
    history_spread_tasks: int = 100_000
    history_many_jobs: int = 5_000
    only_history: bool = False
    skip_sharing: bool = False
    full: bool = False
    timeout: float = 900.0
    log_level: str = "WARNING"
    profile: bool = False
    output: Path = Path("bench/results.json")
    keep_databases: bool = False
