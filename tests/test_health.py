"""/healthz and /metrics over real HTTP, against in-process daemons and real databases:
the private PostgreSQL is stopped and started, the listener's connection is cut, the
event loop is stalled."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import anyio
from prometheus_client.parser import text_string_to_metric_families

from herder import db
from herder.daemon import Daemon
from tests.private_pg import PrivatePostgres
from tests.support import DaemonProcess, running_daemon, submit, wait_finished, wait_for

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def get(daemon: Daemon, path: str, **headers: str) -> tuple[int, str, str]:
    """(status, body, content type) of a GET on the daemon's health port."""
    url = f"http://127.0.0.1:{daemon.health_port}{path}"
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.get(url, headers=headers) as response,
    ):
        return response.status, await response.text(), response.headers["Content-Type"]


async def healthz(daemon: Daemon) -> tuple[int, dict[str, Any]]:
    status, body, content_type = await get(daemon, "/healthz")
    assert content_type.startswith("application/json")
    parsed: dict[str, Any] = json.loads(body)
    return status, parsed


async def metrics(daemon: Daemon) -> Samples:
    status, body, content_type = await get(daemon, "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain; version=")
    samples: Samples = {}
    for family in text_string_to_metric_families(body):
        assert family.name.startswith("herder_"), family.name
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def wait_health(
    daemon: Daemon, check: Callable[[int, dict[str, Any]], bool], what: str, timeout: float = 30
) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        status, body = await healthz(daemon)
        return body if check(status, body) else None

    return await wait_for(probe, timeout=timeout, interval=0.05, what=what)


def healthy(status: int, body: dict[str, Any]) -> bool:
    return status == 200 and body["status"] == "ok"


async def test_healthz_reports_every_check(db_url: str) -> None:
    async with running_daemon(db_url, concurrency=3) as daemon:
        assert daemon.health_port > 0  # port 0 asked for, the bound one reported
        body = await wait_health(daemon, healthy, "a healthy daemon")
        assert body["database"] is True
        assert body["listener"] == "connected"
        assert 0 <= body["event_loop_lag_seconds"] < 1
        assert (body["running_tasks"], body["held_tasks"], body["preparing_jobs"]) == (0, 0, 0)
        assert body["name"] == daemon.name
        assert body["uptime_seconds"] > 0
        assert body["failed"] == []
        status, _, _ = await get(daemon, "/nothing-here")
        assert status == 404


async def test_healthz_without_listener(db_url: str) -> None:
    async with running_daemon(db_url, listen=False) as daemon:
        body = await wait_health(daemon, healthy, "a healthy daemon")
        assert body["listener"] == "disabled"
        samples = await metrics(daemon)
        assert value(samples, "herder_listener_connected") is None


async def test_metrics_after_a_job(db_url: str, conn: db.Connection) -> None:
    async with running_daemon(db_url) as daemon:
        job_id = await submit(conn, "synthetic", {"tasks": 50})
        assert (await wait_finished(conn, job_id))["status"] == "SUCCESS"
        samples = await metrics(daemon)

    finished = value(samples, "herder_tasks_finished_total", kind="synthetic", status="SUCCESS")
    assert finished == 50
    assert value(samples, "herder_task_duration_seconds_count", kind="synthetic") == 50
    assert value(samples, "herder_jobs_settled_total", kind="synthetic", status="SUCCESS") == 1
    assert value(samples, "herder_job_start_latency_seconds_count") == 1
    assert value(samples, "herder_tasks_prepared_total", kind="synthetic") == 50
    claims = value(samples, "herder_claims_total")
    assert claims is not None and claims >= 1
    assert value(samples, "herder_claim_batch_size_sum") == 50
    assert value(samples, "herder_database_up") == 1
    for status in ("PENDING", "IN_PROGRESS"):
        assert value(samples, "herder_queue_depth", status=status) == 0
    for status in ("UNVERIFIED", "PREPARING", "PENDING", "IN_PROGRESS", "CANCELING"):
        assert value(samples, "herder_jobs", status=status) == 0
    assert value(samples, "herder_listener_connected") == 1
    assert value(samples, "herder_listener_reconnects_total") == 0
    lag = value(samples, "herder_event_loop_lag_seconds")
    assert lag is not None and 0 <= lag < 1
    assert value(samples, "herder_tasks_running") == 0
    assert value(samples, "herder_tasks_held") == 0
    rss = value(samples, "herder_process_resident_memory_bytes")
    assert rss is not None and rss > 0


async def test_metrics_queue_depth_while_a_job_runs(db_url: str, conn: db.Connection) -> None:
    async with running_daemon(db_url, concurrency=2, prefetch=2) as daemon:
        job_id = await submit(conn, "synthetic", {"tasks": 8, "task_ms": 2000})

        async def busy() -> Samples | None:
            samples = await metrics(daemon)
            pending = value(samples, "herder_queue_depth", status="PENDING") or 0
            running = value(samples, "herder_queue_depth", status="IN_PROGRESS") or 0
            jobs = value(samples, "herder_jobs", status="IN_PROGRESS")
            return samples if pending > 0 and running == 2 and jobs == 1 else None

        samples = await wait_for(busy, what="queue depth of a running job")
        assert value(samples, "herder_tasks_running") == 2
        assert (value(samples, "herder_queue_depth", status="PENDING") or 0) <= 6
        status, body = await healthz(daemon)
        assert status == 200
        assert body["running_tasks"] == 2
        assert await conn.fetchval("SELECT herder.cancel_job($1)", job_id)
        assert (await wait_finished(conn, job_id))["status"] == "CANCELED"


async def test_openmetrics_when_asked(db_url: str) -> None:
    async with running_daemon(db_url) as daemon:
        accept = "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
        status, body, content_type = await get(daemon, "/metrics", Accept=accept)
    assert status == 200
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith("# EOF")
    assert "herder_database_up 1.0" in body


async def test_healthz_follows_the_database_down_and_up(
    private_pg: PrivatePostgres, private_db_url: str
) -> None:
    stopped = False
    async with running_daemon(private_db_url) as daemon:
        try:
            await wait_health(daemon, healthy, "a healthy daemon")
            await anyio.to_thread.run_sync(private_pg.stop)
            stopped = True
            started = time.monotonic()
            body = await wait_health(
                daemon, lambda status, body: status == 503, "503 with PostgreSQL stopped"
            )
            assert time.monotonic() - started < 5
            assert body["status"] == "unhealthy"
            assert body["database"] is False
            assert "database" in body["failed"]
            # /metrics still answers, and says the database is down.
            samples = await metrics(daemon)
            assert value(samples, "herder_database_up") == 0
            assert value(samples, "herder_queue_depth", status="PENDING") is None
            assert value(samples, "herder_tasks_finished_total") is None  # no kind yet

            await anyio.to_thread.run_sync(private_pg.start)
            stopped = False
            body = await wait_health(daemon, healthy, "200 after PostgreSQL restarted")
            assert (body["database"], body["listener"]) == (True, "connected")
            samples = await metrics(daemon)
            assert value(samples, "herder_database_up") == 1
            reconnects = value(samples, "herder_listener_reconnects_total")
            assert reconnects is not None and reconnects >= 1
        finally:
            if stopped:
                await anyio.to_thread.run_sync(private_pg.start)


LISTENER_BACKEND = """
SELECT pid FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
  AND (query = 'SELECT 1' OR query LIKE 'LISTEN %')
"""


async def test_healthz_fails_while_the_listener_is_disconnected(
    server_url: str, db_url: str, conn: db.Connection
) -> None:
    """The listener's connection is cut and cannot come back (the database refuses new
    connections), while the daemon's pool keeps its connections: /healthz must say 503
    because of the listener alone."""
    database = await conn.fetchval("SELECT current_database()")
    admin = await db.connect(server_url)  # ALTER DATABASE is said from another database
    async with running_daemon(db_url) as daemon:
        await wait_health(daemon, healthy, "a healthy daemon")

        # The listener's backend: the only one whose last statement is its LISTEN or its
        # keep-alive (pool connections show asyncpg's reset query once released).
        async def listener_pid() -> list[int] | None:
            pids = [r["pid"] for r in await conn.fetch(LISTENER_BACKEND)]
            return pids if len(pids) == 1 else None

        [pid] = await wait_for(listener_pid, what="the listener's backend")
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        try:
            assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
            body = await wait_health(
                daemon,
                lambda status, body: status == 503 and body["database"] is True,
                "503 for the listener alone",
            )
            assert body["listener"] == "disconnected"
            assert body["failed"] == ["listener"]
            samples = await metrics(daemon)
            assert value(samples, "herder_listener_connected") == 0
        finally:
            await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
            await admin.close()
        body = await wait_health(daemon, healthy, "200 once the listener is back")
        assert body["listener"] == "connected"
        assert daemon.listener is not None and daemon.listener.reconnects >= 1


async def test_healthz_fails_when_the_event_loop_stalls(db_url: str) -> None:
    async with running_daemon(db_url) as daemon:
        await wait_health(daemon, healthy, "a healthy daemon")
        daemon.health.max_loop_lag = 0.3
        daemon.health.loop.window = 1.0
        time.sleep(0.8)  # noqa: ASYNC251 -- stalls the daemon's event loop, on purpose
        status, body = await healthz(daemon)
        assert status == 503
        assert body["failed"] == ["event_loop"]
        assert body["event_loop_lag_seconds"] >= 0.5
        samples = await metrics(daemon)
        lag = value(samples, "herder_event_loop_lag_seconds")
        assert lag is not None and lag >= 0.5
        # The stall leaves the window; the daemon is healthy again.
        await wait_health(daemon, healthy, "200 after the stall", timeout=10)


async def test_a_taken_health_port_stops_the_daemon_with_one_line(
    db_url: str, daemons: Callable[..., DaemonProcess]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = daemons(db_url, "--health-addr", f"127.0.0.1:{port}")
        assert await daemon.exited() != 0
    assert f"cannot serve /healthz on 127.0.0.1:{port}" in daemon.log
    assert "Traceback" not in daemon.log

    bad = daemons(db_url, "--health-addr", "nowhere")
    assert await bad.exited() != 0
    assert "expected HOST:PORT" in bad.log
    assert "Traceback" not in bad.log
