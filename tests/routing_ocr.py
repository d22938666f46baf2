"""An app module serving the kind 'ocr' only (tests/test_routing.py)."""

from __future__ import annotations

import os

import herder

kind = herder.Kind("ocr")


@kind.process
def process(task: herder.TaskContext) -> herder.JSON:
    return {"kind": "ocr", "pid": os.getpid()}
