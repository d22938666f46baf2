"""The daemon: wires coordinator, worker, hook runner, listener and the periodic sweep in
one task group, and shuts them down in order."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import time
from dataclasses import dataclass, field

import anyio
import anyio.abc
import structlog

from herder import db
from herder import listener as channels
from herder.coordinator import Coordinator
from herder.health import HealthServer
from herder.hooks import HookRunner
from herder.kinds import check_kinds, known_kinds, load_app, processes
from herder.listener import Listener
from herder.maintenance import Maintenance
from herder.metrics import Metrics
from herder.resilience import TRANSIENT, Backoff, retrying, supervise
from herder.status import DaemonStatus
from herder.store import Store
from herder.systemd import Notifier, status_line
from herder.worker import Worker

log = structlog.get_logger("herder.daemon")


@dataclass
class DaemonConfig:
    database_url: str
    concurrency: int = 10
    apps: list[str] = field(default_factory=list)
    health_addr: str = "127.0.0.1:9464"
    lease_seconds: float = 30.0
    poll_interval: float = 1.0
    shutdown_timeout: float = 30.0
    listen: bool = True
    prefetch: int | None = None
    #: Off only to measure what fair sharing costs (see herder.claim_tasks).
    fair_sharing: bool = True
    name: str | None = None
    #: Finished jobs older than this are pruned (seconds; 0 keeps everything).
    retention_seconds: float = 30 * 86400.0


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.name = config.name or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        for module in config.apps:
            load_app(module)
        processes.configure(config.apps)
        #: What this daemon claims: the kinds its --app modules declare, and the built-in.
        self.kinds = known_kinds()
        check_kinds()
        self.started_at = time.monotonic()
        self.metrics = Metrics()
        self._stop = anyio.Event()
        self.store: Store
        self.worker: Worker
        self.coordinator: Coordinator
        self.hooks: HookRunner
        self.maintenance: Maintenance
        self._built = False  # run() connects, then builds the parts above
        self.listener: Listener | None = None
        self.health = HealthServer(config.health_addr, self.metrics.registry, self.status)
        self.systemd = Notifier.from_environment()

    def request_stop(self) -> None:
        self._stop.set()

    def status(self) -> DaemonStatus:
        """What /healthz, /metrics and systemd report. Until run() has connected and
        built the parts, none of them exists: nothing runs, nothing is held."""
        built = self._built
        listener = self.listener
        return DaemonStatus(
            name=self.name,
            uptime=time.monotonic() - self.started_at,
            stopping=self._stop.is_set(),
            running=self.worker.running_count if built else 0,
            held=len(self.worker.held) if built else 0,
            preparing=len(self.coordinator.preparing) if built else 0,
            listener=None if listener is None else listener.connected,
            listener_reconnects=0 if listener is None else listener.reconnects,
            database=built and self.maintenance.database_ok,
        )

    @property
    def health_port(self) -> int:
        """The port /healthz and /metrics are served on (the bound one for port 0)."""
        return self.health.port

    async def run(
        self,
        *,
        handle_signals: bool = False,
        task_status: anyio.abc.TaskStatus[Daemon] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        cfg = self.config
        pool = await _create_pool_when_reachable(
            cfg.database_url, min_size=2, max_size=max(6, min(cfg.concurrency, 20)), reset=False
        )
        # Kinds' own queries: connections opened on first use, up to one per executor.
        app_pool = await _create_pool_when_reachable(
            cfg.database_url, min_size=0, max_size=cfg.concurrency, reset=True
        )
        try:
            self.store = Store(pool, app_pool)
            started = await retrying("read the database's clock", self.store.database_clock)
            assert started is not None  # retried without a time limit
            self.worker = Worker(
                self.store,
                self.name,
                metrics=self.metrics,
                concurrency=cfg.concurrency,
                lease=cfg.lease_seconds,
                poll_interval=cfg.poll_interval,
                prefetch=cfg.prefetch,
                kinds=self.kinds,
                fair=cfg.fair_sharing,
            )
            self.coordinator = Coordinator(
                self.store,
                self.name,
                metrics=self.metrics,
                lease=cfg.lease_seconds,
                poll_interval=cfg.poll_interval,
                kinds=self.kinds,
            )
            self.metrics.running.set_function(lambda: self.worker.running_count)
            self.hooks = HookRunner(
                self.store, self.name, lease=cfg.lease_seconds, poll_interval=cfg.poll_interval
            )
            self.maintenance = Maintenance(
                self.store,
                self.name,
                worker=self.worker,
                coordinator=self.coordinator,
                metrics=self.metrics,
                poll_interval=cfg.poll_interval,
                lease=cfg.lease_seconds,
                retention=cfg.retention_seconds,
                wake_all=self._wake_all,
                started=started,
                kinds=self.kinds,
            )
            # Not worth waiting for long: the sweep registers again every time it runs.
            await retrying("register the daemon", self.maintenance.register, timeout=10)
            self._built = True
            async with anyio.create_task_group() as tg:
                if handle_signals:
                    tg.start_soon(self._signals)
                await tg.start(self.health.run, self.store)
                if cfg.listen:
                    self.listener = Listener(cfg.database_url, self._on_notify, self._wake_all)
                    tg.start_soon(supervise, "listener", self.listener.run)
                tg.start_soon(supervise, "coordinator", self.coordinator.run)
                tg.start_soon(supervise, "hooks", self.hooks.run)
                tg.start_soon(supervise, "sweep", self.maintenance.run_sweep)
                if cfg.retention_seconds > 0:
                    tg.start_soon(supervise, "retention", self.maintenance.run_prune)
                await tg.start(self.worker.run)
                log.info(
                    "serving",
                    name=self.name,
                    concurrency=cfg.concurrency,
                    listen=cfg.listen,
                    health=self.health.address,
                )
                tg.start_soon(self.systemd.run, lambda: status_line(self.status()))
                task_status.started(self)
                await self._stop.wait()
                self.systemd.stopping(status_line(self.status()))
                log.info("stopping: no more claims", shutdown_timeout=cfg.shutdown_timeout)
                await self.coordinator.stop()
                await self.worker.shutdown(cfg.shutdown_timeout)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                if self._built:
                    try:
                        await self.store.forget_daemon(self.name)
                    except Exception as exc:  # its lease runs out instead
                        log.warning("could not remove this daemon's row", error=str(exc))
                await app_pool.close()
                await pool.close()
            processes.close()
        log.info("stopped")

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal received", signal=signal.Signals(signum).name)
                self.request_stop()

    def _wake_all(self) -> None:
        self.worker.wakeup.set()
        self.coordinator.wakeup.set()
        self.hooks.wakeup.set()

    def _on_notify(self, channel: str, _payload: str) -> None:
        """Wake the loop concerned. A notification carries no authority: anyone may send
        one, with any payload, so none is read; the loops ask the database."""
        if channel == channels.TASKS:
            self.worker.wakeup.set()
        elif channel == channels.JOBS:
            self.coordinator.wakeup.set()
            self.maintenance.look_soon()  # a resume or retry to carry out
        elif channel == channels.JOB_FINISHED:
            self.hooks.wakeup.set()
        elif channel == channels.CANCEL:
            self.maintenance.look_soon()


async def _create_pool_when_reachable(
    url: str, *, min_size: int, max_size: int, reset: bool
) -> db.Pool:
    backoff = Backoff(0.1, 5.0)
    while True:
        try:
            return await db.create_pool(
                url, min_size=min_size, max_size=max_size, reset_sessions=reset
            )
        except TRANSIENT as exc:
            log.warning("database unreachable; retrying", error=str(exc))
            await backoff.wait()
