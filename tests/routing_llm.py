"""An app module serving the kind 'llm' only (tests/test_routing.py)."""

from __future__ import annotations

import os

import herder

kind = herder.Kind("llm")


@kind.process
def process(task: herder.TaskContext) -> herder.JSON:
    return {"kind": "llm", "pid": os.getpid()}
