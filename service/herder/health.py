"""The daemon's HTTP endpoint: ``GET /healthz`` and ``GET /metrics`` on ``--health-addr``.

Served by aiohttp inside the daemon's task group, so it answers only while the daemon's
event loop does. ``/healthz`` checks the database live (a ``SELECT 1`` within a second),
the listener and the event loop's lag; ``/metrics`` is the daemon's Prometheus registry
plus values read at scrape time: queue depth from the database, listener state, lag.
What it says of the daemon itself comes from the ``DaemonStatus`` it is handed.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import anyio.abc
import structlog
from aiohttp import web
from prometheus_client import ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from herder.address import parse_addr
from herder.states import JOB_FINISHED, JobStatus, TaskStatus
from herder.status import DaemonStatus
from herder.store import Store

log = structlog.get_logger("herder.health")

#: How long the live database check of /healthz and /metrics may take.
DATABASE_TIMEOUT = 1.0
#: Job statuses counted at scrape time: the unfinished ones. Finished jobs are history
#: (``herder_jobs_settled_total`` counts them) and counting them would grow with it.
ACTIVE_JOB_STATUSES = tuple(s.value for s in JobStatus if s not in JOB_FINISHED)
QUEUE_STATUSES = (TaskStatus.PENDING.value, TaskStatus.IN_PROGRESS.value)


class LoopMonitor:
    """Measures how late the event loop wakes a task that sleeps ``interval`` seconds.

    ``lag`` is the worst lateness seen in the last ``window`` seconds, or how overdue the
    current wake-up already is, whichever is larger: a scrape every 15 s still sees a
    stall that lasted a second, and a loop that is stalled right now counts at once.
    """

    def __init__(self, interval: float = 0.25, window: float = 10.0) -> None:
        self.interval = interval
        self.window = window
        self._samples: deque[tuple[float, float]] = deque()
        self._due: float | None = None

    @property
    def lag(self) -> float:
        now = time.monotonic()
        self._prune(now)
        worst = max((lag for _, lag in self._samples), default=0.0)
        overdue = 0.0 if self._due is None else now - self._due
        return max(worst, overdue, 0.0)

    async def run(self) -> None:
        while True:
            self._due = time.monotonic() + self.interval
            await anyio.sleep(self.interval)
            now = time.monotonic()
            self._samples.append((now, max(0.0, now - self._due)))
            self._prune(now)

    def _prune(self, now: float) -> None:
        while self._samples and self._samples[0][0] < now - self.window:
            self._samples.popleft()


class ScrapeCollector(Collector):
    """Values that only make sense read at scrape time. ``HealthServer.refresh`` reads the
    database first (``collect`` is synchronous); the rest is the daemon's status."""

    def __init__(self, server: HealthServer) -> None:
        self.server = server
        self.database_up = False
        self.tasks: dict[str, int] | None = None
        self.jobs: dict[str, int] | None = None

    def describe(self) -> list[Metric]:
        return []  # else registration would collect once, before the daemon serves

    def collect(self) -> Iterator[Metric]:
        snapshot = self.server.status()
        up = GaugeMetricFamily(
            "herder_database_up", "1 when the database answered this scrape's query"
        )
        up.add_metric([], 1.0 if self.database_up else 0.0)
        yield up
        if self.database_up and self.tasks is not None and self.jobs is not None:
            depth = GaugeMetricFamily(
                "herder_queue_depth",
                "Tasks by status, in the whole database (same on every daemon)",
                labels=["status"],
            )
            for status in QUEUE_STATUSES:
                depth.add_metric([status], self.tasks.get(status, 0))
            yield depth
            jobs = GaugeMetricFamily(
                "herder_jobs",
                "Unfinished jobs by status, in the whole database (same on every daemon)",
                labels=["status"],
            )
            for status in ACTIVE_JOB_STATUSES:
                jobs.add_metric([status], self.jobs.get(status, 0))
            yield jobs
        if snapshot.listener is not None:  # --no-listen: no listener, so no metric to alert on
            connected = GaugeMetricFamily(
                "herder_listener_connected", "1 while the LISTEN connection is up"
            )
            connected.add_metric([], 1.0 if snapshot.listener else 0.0)
            yield connected
            reconnects = CounterMetricFamily(
                "herder_listener_reconnects", "Times the LISTEN connection was lost"
            )
            reconnects.add_metric([], snapshot.listener_reconnects)
            yield reconnects
        lag = GaugeMetricFamily(
            "herder_event_loop_lag_seconds",
            f"Worst event-loop lag in the last {self.server.loop.window:g} s",
        )
        lag.add_metric([], self.server.loop.lag)
        yield lag
        held = GaugeMetricFamily(
            "herder_tasks_held", "Tasks this daemon has claimed: running or prefetched"
        )
        held.add_metric([], snapshot.held)
        yield held
        preparing = GaugeMetricFamily(
            "herder_preparations_running", "Jobs this daemon is preparing now"
        )
        preparing.add_metric([], snapshot.preparing)
        yield preparing
        uptime = GaugeMetricFamily("herder_uptime_seconds", "Seconds since this daemon started")
        uptime.add_metric([], snapshot.uptime)
        yield uptime


class HealthServer:
    """``/healthz`` and ``/metrics`` of one daemon; ``run`` serves until cancelled."""

    def __init__(
        self, addr: str, registry: CollectorRegistry, status: Callable[[], DaemonStatus]
    ) -> None:
        self.addr = addr
        self.host, self.port = parse_addr(addr)
        self.registry = registry
        self.status = status
        #: The database the checks ask; set by run(), before anything is served.
        self.store: Store
        self.loop = LoopMonitor()
        #: /healthz fails when the event loop lagged more than this (seconds).
        self.max_loop_lag = 5.0
        self.collector = ScrapeCollector(self)
        registry.register(self.collector)
        ProcessCollector(namespace="herder", registry=registry)
        self.app = web.Application()
        self.app.router.add_get("/healthz", self.healthz)
        self.app.router.add_get("/metrics", self.metrics)

    @property
    def address(self) -> str:
        host = self.host or "0.0.0.0"
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    async def run(
        self, store: Store, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        self.store = store
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            try:
                await site.start()
            except OSError as exc:
                raise OSError(
                    exc.errno,
                    f"cannot serve /healthz on {self.addr}: {exc.strerror}",
                ) from exc
            self.port = int(runner.addresses[0][1])  # the bound one when asked for port 0
            log.info("health endpoint up", address=self.address)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.loop.run)
                task_status.started(self.port)
                await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(3):
                await runner.cleanup()

    # ------------------------------------------------------------ checks

    async def database_answers(self) -> bool:
        try:
            with anyio.fail_after(DATABASE_TIMEOUT):
                await self.store.ping()
        except Exception as exc:  # anything at all means "not answering"
            log.debug("database check failed", error=f"{type(exc).__name__}: {exc}")
            return False
        return True

    async def refresh(self) -> None:
        """Read the scrape-time values from the database; on failure, report it down."""
        c = self.collector
        try:
            with anyio.fail_after(DATABASE_TIMEOUT):
                c.tasks, c.jobs = await self.store.queue_depth(ACTIVE_JOB_STATUSES)
            c.database_up = True
        except Exception as exc:
            log.debug("queue depth unavailable", error=f"{type(exc).__name__}: {exc}")
            c.database_up, c.tasks, c.jobs = False, None, None

    async def health(self) -> dict[str, Any]:
        """The body of /healthz; ``status`` is ``ok`` when every check passes."""
        database = await self.database_answers()
        status = self.status()
        listening = (
            "disabled"
            if status.listener is None
            else "connected"
            if status.listener
            else "disconnected"
        )
        lag = self.loop.lag
        failed = [
            name
            for name, ok in (
                ("database", database),
                ("listener", listening != "disconnected"),
                ("event_loop", lag <= self.max_loop_lag),
            )
            if not ok
        ]
        return {
            "status": "unhealthy" if failed else "ok",
            "failed": failed,
            "database": database,
            "listener": listening,
            "event_loop_lag_seconds": round(lag, 4),
            "running_tasks": status.running,
            "held_tasks": status.held,
            "preparing_jobs": status.preparing,
            "name": status.name,
            "uptime_seconds": round(status.uptime, 3),
        }

    # ------------------------------------------------------------ handlers

    async def healthz(self, request: web.Request) -> web.Response:
        body = await self.health()
        return web.Response(
            text=json.dumps(body) + "\n",
            status=200 if body["status"] == "ok" else 503,
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )

    async def metrics(self, request: web.Request) -> web.Response:
        await self.refresh()
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(
            body=encoder(self.registry),
            headers={"Content-Type": content_type, "Cache-Control": "no-store"},
        )
