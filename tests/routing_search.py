"""An app module serving the kind 'search' only (tests/test_routing.py)."""

from __future__ import annotations

import os

import herder

kind = herder.Kind("search")


@kind.process
def process(task: herder.TaskContext) -> herder.JSON:
    return {"kind": "search", "pid": os.getpid()}
