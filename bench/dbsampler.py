"""A poor man's pg_stat_statements (the embedded server has none): sample the active
backends of one database in pg_stat_activity and count, per statement and wait event,
how often each was seen running. Share of samples ~ share of database time."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import anyio
import asyncpg

_COMMENT = re.compile(r"--[^\n]*")
_SPACE = re.compile(r"\s+")


def statement_key(query: str, width: int = 90) -> str:
    text = _SPACE.sub(" ", _COMMENT.sub("", query)).strip()
    return text[:width]


@dataclass
class DbSampler:
    url: str
    interval: float = 0.02
    samples: int = 0  # polls taken
    seen: Counter[tuple[str, str]] = field(default_factory=Counter)
    _ignore: str = "pg_stat_activity"

    async def run(self) -> None:
        """Sample until cancelled."""
        conn = await asyncpg.connect(self.url)
        try:
            while True:
                rows = await conn.fetch(
                    """
                    SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU') AS wait, query
                    FROM pg_stat_activity
                    WHERE datname = current_database() AND state = 'active'
                      AND pid <> pg_backend_pid()
                    """
                )
                self.samples += 1
                for row in rows:
                    if self._ignore not in row["query"]:
                        self.seen[(statement_key(row["query"]), row["wait"])] += 1
                await anyio.sleep(self.interval)
        finally:
            with anyio.CancelScope(shield=True):
                await conn.close()

    def top(self, limit: int = 12) -> list[tuple[str, str, float]]:
        """(statement, wait event, mean active backends) by time, most first."""
        if not self.samples:
            return []
        return [
            (statement, wait, n / self.samples)
            for (statement, wait), n in self.seen.most_common(limit)
        ]
