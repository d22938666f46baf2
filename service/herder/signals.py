"""A level-triggered wake-up shared by a loop and whoever has news for it."""

from __future__ import annotations

import anyio


class Wakeup:
    """``set()`` wakes the current or next ``wait()``; several sets before a wait count once.

    LISTEN/NOTIFY, the poll, and internal events (capacity freed, a retry falling due) all
    call ``set()``; the loop that owns it re-queries the database after every wait.
    """

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait until set or ``timeout`` seconds; True when it was set."""
        if not self._event.is_set():
            with anyio.move_on_after(timeout):
                await self._event.wait()
        woken = self._event.is_set()
        if woken:
            self._event = anyio.Event()
        return woken
