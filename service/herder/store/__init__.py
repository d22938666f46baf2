"""The database behind one interface: every read and write herder makes, as methods.

Coordinator, worker, CLI and tests go through ``Store``; none of them writes SQL. The
queries themselves live in ``sql/queries.sql``, and each method runs one (or a batched
loop of one, or the few statements of one transaction). The methods are grouped by what
their statements are about: ``preparation``, ``tasks``, ``settlement``, ``jobs`` and
``fleet``.
"""

from __future__ import annotations

from herder.db import Pool
from herder.store.fleet import FleetStatements
from herder.store.jobs import CONTROL_ACTIONS, JobStatements
from herder.store.preparation import (
    CopyModes,
    PreparationClaim,
    PreparationStatements,
    SmallPreparation,
)
from herder.store.settlement import FinishHookClaim, SettledJob, SettlementStatements
from herder.store.tasks import ClaimedTask, Outcome, TaskStatements

__all__ = [
    "CONTROL_ACTIONS",
    "ClaimedTask",
    "CopyModes",
    "FinishHookClaim",
    "Outcome",
    "PreparationClaim",
    "SettledJob",
    "SmallPreparation",
    "Store",
]


class Store(
    PreparationStatements, TaskStatements, SettlementStatements, JobStatements, FleetStatements
):
    def __init__(
        self, pool: Pool, app_pool: Pool | None = None, *, unchecked_copy: bool | None = None
    ) -> None:
        """``unchecked_copy``: load batches and small preparations with the foreign key's
        per-row checks off (see herder.preparation). None: whenever the database role may;
        False: never."""
        self.pool = pool
        #: The pool kinds' code gets (JobContext.pool, TaskContext.pool): its sessions are
        #: reset between uses, so nothing a kind sets can leak into herder's queries.
        self.app_pool = app_pool or pool
        self._unchecked_copy = unchecked_copy
        self._copy_modes: CopyModes | None = None
