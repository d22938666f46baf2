"""Kinds whose plain handlers run in worker processes (executor="process"): a worker
process imports this module to find them, as a daemon's --app."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import herder

cpu_bound = herder.Kind("test-cpu-bound", executor="process", max_attempts=1)


@cpu_bound.process
def burn(task: herder.TaskContext) -> herder.JSON:
    """Holds a core (and, in a thread, the interpreter lock) for a while."""
    deadline = time.monotonic() + task.payload["seconds"]
    spins = 0
    while time.monotonic() < deadline:
        spins += sum(i * i for i in range(1000)) > 0
    return {"pid": os.getpid(), "spins": spins}


hangs = herder.Kind("test-hangs-in-process", executor="process", timeout=0.5, max_attempts=1)


@hangs.process
def hang(task: herder.TaskContext) -> herder.JSON:
    Path(task.payload["pid_file"]).write_text(str(os.getpid()))
    while True:
        pass


crashes = herder.Kind("test-crashes-in-process", executor="process", max_attempts=2)


@crashes.process
def crash(task: herder.TaskContext) -> herder.JSON:
    if task.payload.get("crash") and task.attempt == 1:
        os._exit(3)
    try:
        _ = task.pool.fetchval  # the daemon's pool is not here
    except RuntimeError as exc:
        return {"attempt": task.attempt, "pool": str(exc)}
    return {"attempt": task.attempt}


whole = herder.Kind("test-all-in-process", executor="process")


@whole.prepare
def prepare_in_process(job: herder.JobContext) -> Iterator[herder.JSON]:
    for i in range(job.payload["tasks"]):
        yield {"i": i, "pid": os.getpid()}


@whole.process
def process_in_process(task: herder.TaskContext) -> herder.JSON:
    return {"pid": os.getpid()}


@whole.on_finished
def finished_in_process(job: herder.FinishedJob) -> None:
    Path(job.payload["hook_file"]).write_text(f"{job.status} {os.getpid()}")


class TwoPartError(Exception):
    """Pickles, but does not unpickle: its __init__ needs two arguments."""

    def __init__(self, part: str, other: str) -> None:
        super().__init__(f"{part} and {other}")


awkward = herder.Kind("test-awkward-exception", executor="process", max_attempts=1)


@awkward.process
def raise_awkwardly(task: herder.TaskContext) -> herder.JSON:
    raise TwoPartError("report 7", "its lesion sizes")
