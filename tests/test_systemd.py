"""systemd's notify protocol, with a real datagram socket standing in for systemd."""

from __future__ import annotations

import dataclasses
import itertools
import os
import secrets
import signal
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from herder import db
from herder.status import DaemonStatus
from herder.systemd import Notifier, status_line
from tests.support import DaemonProcess, submit, wait_for


class FakeSystemd:
    """The receiving end of ``NOTIFY_SOCKET``: every datagram, with when it arrived."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)
        self.datagrams: list[tuple[float, list[str]]] = []

    def drain(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return
            self.datagrams.append((time.monotonic(), data.decode().split("\n")))

    def times(self, line: str) -> list[float]:
        """When each datagram carrying ``line`` arrived."""
        self.drain()
        return [at for at, lines in self.datagrams if line in lines]

    def statuses(self) -> list[str]:
        self.drain()
        return [x.removeprefix("STATUS=") for _, lines in self.datagrams for x in lines
                if x.startswith("STATUS=")]  # fmt: skip

    async def wait(self, line: str, timeout: float = 30.0) -> float:
        async def arrived() -> float | None:
            times = self.times(line)
            return times[0] if times else None

        return await wait_for(arrived, timeout=timeout, what=f"{line!r} from the daemon")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(str(tmp_path / "notify.sock"))
    yield fake
    fake.close()


async def test_herder_run_speaks_sd_notify(
    db_url: str,
    conn: db.Connection,
    daemons: Callable[..., DaemonProcess],
    systemd: FakeSystemd,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # 1 s: a ping every 0.5 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    daemon = daemons(
        db_url, "--health-addr", "127.0.0.1:0", "--concurrency", "2", "--shutdown-timeout", "20"
    )
    ready = await systemd.wait("READY=1")
    assert '"serving"' in daemon.log  # READY=1 once serving, not before
    assert systemd.statuses()[0].startswith("serving: 0 running, 0 held, 0 preparing, listener")

    async def pings() -> list[float] | None:
        times = [t for t in systemd.times("WATCHDOG=1") if t >= ready]
        return times if len(times) >= 7 else None

    times = await wait_for(pings, timeout=15, what="seven watchdog pings")
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert 0.4 <= statistics.mean(gaps) <= 0.65, gaps
    assert max(gaps) < 1.0, gaps  # never late enough for systemd to kill the daemon

    # Work shows in the status line; SIGTERM sends STOPPING=1 before the drain.
    job_id = await submit(conn, "synthetic", {"tasks": 2, "task_ms": 2500})

    async def two_running() -> bool:
        return any(s.startswith("serving: 2 running") for s in systemd.statuses())

    await wait_for(two_running, what="STATUS= with two running tasks")
    daemon.signal(signal.SIGTERM)
    stopping = await systemd.wait("STOPPING=1")
    assert daemon.proc.poll() is None  # still draining its running tasks
    assert "stopping: draining 2 running tasks" in systemd.statuses()
    assert await daemon.exited() == 0
    # The watchdog kept being fed during the drain, and the drained tasks finished.
    assert len([t for t in systemd.times("WATCHDOG=1") if t > stopping]) >= 2
    finished = await conn.fetchval(
        "SELECT count(*) FROM herder.tasks WHERE job_id = $1 AND status = 'SUCCESS'", job_id
    )
    assert finished == 2


def test_status_line_renders_the_snapshot() -> None:
    """The states a running daemon seldom shows: no listener, a lost one, no database."""
    status = DaemonStatus(
        name="d",
        uptime=1.0,
        stopping=False,
        running=1,
        held=5,
        preparing=2,
        listener=None,
        listener_reconnects=0,
        database=True,
    )
    assert status_line(status) == "serving: 1 running, 5 held, 2 preparing, listener off"
    lost = dataclasses.replace(status, listener=False, database=False)
    assert status_line(lost) == (
        "serving: 1 running, 5 held, 2 preparing, listener disconnected, database unreachable"
    )
    stopping = dataclasses.replace(status, stopping=True)
    assert status_line(stopping) == "stopping: draining 1 running tasks"


async def test_abstract_socket_address() -> None:
    name = f"herder-test-{os.getpid()}-{secrets.token_hex(4)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        notifier = Notifier("@" + name)
        assert notifier.enabled
        assert notifier.notify("READY=1", "STATUS=hello")
        assert receiver.recv(4096) == b"READY=1\nSTATUS=hello"
        notifier.close()


async def test_without_notify_socket_nothing_happens() -> None:
    notifier = Notifier.from_environment({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.watchdog is None
    assert not notifier.notify("READY=1")
    with anyio.fail_after(1):
        await notifier.run(lambda: "never asked")  # returns at once


async def test_watchdog_settings_from_the_environment(tmp_path: Path) -> None:
    path = str(tmp_path / "n.sock")
    mine = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_environment(mine).watchdog == 30.0
    assert Notifier.from_environment({**mine, "WATCHDOG_PID": "1"}).watchdog is None
    assert Notifier.from_environment({**mine, "WATCHDOG_USEC": "junk"}).watchdog is None
    assert Notifier.from_environment({"NOTIFY_SOCKET": "relative"}).enabled is False
    # Nobody listening: the notification is lost, quietly.
    assert Notifier(path).notify("READY=1") is False


async def test_a_stalled_event_loop_stops_the_watchdog(
    systemd: FakeSystemd, tmp_path: Path
) -> None:
    """The pings come from the event loop: while it is stuck, systemd hears nothing."""
    notifier = Notifier(str(tmp_path / "notify.sock"), watchdog_usec=200_000)
    stalled = float("inf")

    async def pinged() -> bool:
        return len([t for t in systemd.times("WATCHDOG=1") if t > stalled]) >= 3

    async with anyio.create_task_group() as tg:
        tg.start_soon(notifier.run, lambda: "testing")
        await wait_for(lambda: wait_for_pings(systemd, 3), what="pings")
        time.sleep(1.0)  # noqa: ASYNC251 -- the stall under test
        stalled = time.monotonic()
        await wait_for(pinged, what="pings after the stall")
        tg.cancel_scope.cancel()
    times = systemd.times("WATCHDOG=1")
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert max(gaps) >= 0.9  # the stall shows as a gap in the pings
    assert sorted(gaps)[len(gaps) // 2] < 0.3  # otherwise every 0.1 s
    notifier.close()


async def wait_for_pings(systemd: FakeSystemd, n: int) -> bool:
    return len(systemd.times("WATCHDOG=1")) >= n
