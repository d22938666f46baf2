"""What a daemon says about itself: one snapshot that ``/healthz``, ``/metrics`` and
systemd's ``STATUS=`` line all render. They get the snapshot, not the daemon, so they
need not know which of its parts exist yet, and the daemon can import them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DaemonStatus:
    name: str
    #: Seconds since the daemon was created.
    uptime: float
    #: Shutdown has begun: no more claims, running tasks drain.
    stopping: bool
    #: Tasks in a handler now.
    running: int
    #: Tasks claimed and not yet written back: running, queued or being written.
    held: int
    #: Preparations this daemon holds.
    preparing: int
    #: Whether the LISTEN connection is up; None when there is none (``--no-listen``).
    listener: bool | None
    #: Times the LISTEN connection was lost.
    listener_reconnects: int
    #: Connected, and the last sweep reached the database. Not a live check: /healthz
    #: asks the database itself.
    database: bool
