"""Statements about the daemons themselves: their rows in herder.daemons, and the jobs no
live daemon serves."""

from __future__ import annotations

from typing import Any

from herder.db import Pool
from herder.sql import QUERIES as Q


class FleetStatements:
    pool: Pool

    async def register_daemon(
        self,
        name: str,
        host: str,
        pid: int,
        kinds: list[str],
        lease: float,
        *,
        starting: bool = False,
    ) -> None:
        """Write (``starting``) or renew this daemon's row for ``lease`` seconds."""
        await self.pool.execute(
            *Q.bind(
                "register_daemon",
                name=name,
                host=host,
                pid=pid,
                kinds=kinds,
                lease_seconds=lease,
                starting=starting,
            )
        )

    async def register_kinds(self, limits: dict[str, int | None]) -> None:
        """Create the herder.kinds rows of these kinds (name: declared max_running) that
        do not exist; existing rows, an operator's limits, are kept."""
        await self.pool.execute(
            *Q.bind("register_kinds", names=list(limits), limits=list(limits.values()))
        )

    async def forget_daemon(self, name: str) -> None:
        await self.pool.execute(*Q.bind("forget_daemon", name=name))

    async def expire_daemons(self) -> None:
        await self.pool.execute(Q["expire_daemons"])

    async def mark_unserved_jobs(self) -> int:
        """Mark the PREPARING jobs of kinds no live daemon serves; how many there are."""
        waiting: int = await self.pool.fetchval(Q["mark_unserved_jobs"])
        return waiting

    async def daemons(self) -> list[dict[str, Any]]:
        return [dict(r) for r in await self.pool.fetch(Q["daemons"])]
