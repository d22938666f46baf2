"""Values made ready for the store's statements."""

from __future__ import annotations

from collections.abc import Iterable

from herder.db import storable_text

#: Characters kept of a task's or job's message, and of a traceback.
MESSAGE_LIMIT = 10_000
TRACEBACK_LIMIT = 100_000


def storable(text: str | None, limit: int) -> str | None:
    return None if text is None else storable_text(text, limit)


def columns(pairs: Iterable[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """(id, n) pairs as the two arrays a query unnests."""
    firsts: list[int] = []
    seconds: list[int] = []
    for first, second in pairs:
        firsts.append(first)
        seconds.append(second)
    return firsts, seconds
