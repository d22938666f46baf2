"""systemd's notify protocol (sd_notify(3)), without a dependency: datagrams of
``KEY=VALUE`` lines to the ``AF_UNIX`` socket named by ``NOTIFY_SOCKET``.

``READY=1`` once serving, ``STATUS=`` summaries, ``WATCHDOG=1`` every half
``WATCHDOG_USEC`` and ``STOPPING=1`` when shutdown starts. The watchdog pings are sent by a
task on the daemon's event loop, so a loop that hangs stops pinging and systemd restarts
the service. Everything is a no-op when ``NOTIFY_SOCKET`` is unset.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping

import anyio
import structlog

from herder.status import DaemonStatus

log = structlog.get_logger("herder.systemd")

#: Without a watchdog, how often the STATUS= line is refreshed (seconds).
STATUS_INTERVAL = 5.0


class Notifier:
    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        """``address`` as in ``NOTIFY_SOCKET``: a path, or ``@name`` for an abstract one."""
        self.address: str | None = None
        if address and address[0] in "/@":
            self.address = "\0" + address[1:] if address[0] == "@" else address
        elif address:
            log.warning("unsupported NOTIFY_SOCKET; not notifying systemd", address=address)
        self.watchdog = watchdog_usec / 1e6 if watchdog_usec and self.address else None
        self._sock: socket.socket | None = None
        self._failing = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        watchdog: int | None = None
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        # WATCHDOG_PID names the process the watchdog is for; when it is another (we were
        # started by a wrapper that did not clear it), the pings are not ours to send.
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            watchdog = int(usec)
        return cls(environ.get("NOTIFY_SOCKET"), watchdog)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines; True when it went out. Never blocks
        and never raises: systemd being away must not stop the daemon."""
        if self.address is None or not lines:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            if not self._failing:  # once per outage, not once per ping
                log.warning("cannot notify systemd", error=str(exc))
            self._failing = True
            return False
        self._failing = False
        return True

    def stopping(self, status: str) -> None:
        self.notify("STOPPING=1", f"STATUS={status}")

    async def run(self, status: Callable[[], str]) -> None:
        """``READY=1`` now, then ``WATCHDOG=1`` every half watchdog interval and ``STATUS=``
        whenever ``status()`` changes, until cancelled."""
        if self.address is None:
            return
        text = status()
        ping = ("WATCHDOG=1",) if self.watchdog else ()
        self.notify("READY=1", f"STATUS={text}", *ping)
        log.info("notified systemd", ready=True, watchdog_seconds=self.watchdog)
        tick = min(self.watchdog / 2, STATUS_INTERVAL) if self.watchdog else STATUS_INTERVAL
        while True:
            await anyio.sleep(tick)
            lines = list(ping)
            if (new := status()) != text:
                text = new
                lines.append(f"STATUS={text}")
            self.notify(*lines)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def status_line(status: DaemonStatus) -> str:
    """The short summary ``systemctl status`` shows, e.g. ``serving: 3 running, 120 held,
    0 preparing, listener connected``."""
    if status.stopping:
        return f"stopping: draining {status.running} running tasks"
    parts = [
        f"{status.running} running",
        f"{status.held} held",
        f"{status.preparing} preparing",
        "listener off"
        if status.listener is None
        else f"listener {'connected' if status.listener else 'disconnected'}",
    ]
    if not status.database:
        parts.append("database unreachable")
    return "serving: " + ", ".join(parts)
