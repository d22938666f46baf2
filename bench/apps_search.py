"""A module serving the kind 'bench-search' only: the sharing phase runs two daemons with
different --app modules, as a mixed fleet would."""

from __future__ import annotations

import herder

kind = herder.Kind("bench-search")


@kind.process
def process(task: herder.TaskContext) -> herder.JSON:
    return None
