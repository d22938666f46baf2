"""Kinds the bench's sharing phase runs, imported by its daemons with --app."""

from __future__ import annotations

import time

import herder

sleep = herder.Kind("bench-sleep")


@sleep.process
def sleep_plainly(task: herder.TaskContext) -> herder.JSON:
    """Plain, blocking Python: it runs in a worker thread, not on the event loop."""
    time.sleep(task.payload["seconds"])
    return None
