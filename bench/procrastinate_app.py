"""The Procrastinate side: an app with one no-op task, shared by the process that defers
and the worker process (``python -m bench.procrastinate_app URL --concurrency N``), which
sends ``READY=1`` to ``NOTIFY_SOCKET`` once it works, as ``herder run`` does."""

from __future__ import annotations

import argparse
import logging
import os
import socket
from typing import Any

import anyio
from procrastinate import App, PsycopgConnector

TASK_NAME = "bench_noop"
QUEUE = "bench"


def make_app(url: str, **pool: Any) -> App:
    app = App(connector=PsycopgConnector(conninfo=url, **pool))

    @app.task(name=TASK_NAME, queue=QUEUE)
    async def noop() -> None:
        return None

    return app


async def _work(args: argparse.Namespace) -> None:
    app = make_app(args.url, min_size=1, max_size=max(4, args.concurrency + 2))
    async with app.open_async():

        async def ready() -> None:
            # The worker registers itself (procrastinate_workers) before it fetches;
            # give its LISTEN a moment more, then say we are ready.
            with anyio.fail_after(30):
                await _until_registered(app)
            await anyio.sleep(0.3)
            _notify_ready()

        async with anyio.create_task_group() as tg:
            tg.start_soon(ready)
            await app.run_worker_async(
                concurrency=args.concurrency,
                queues=[QUEUE],
                wait=True,
                install_signal_handlers=True,
            )


def _notify_ready() -> None:
    """sd_notify(3) by hand: herder's notifier would load herder into this process and
    count its memory as Procrastinate's."""
    address = os.environ["NOTIFY_SOCKET"]
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"READY=1", address)


async def _until_registered(app: App) -> None:
    query = "SELECT count(*) AS n FROM procrastinate_workers"
    while not (await app.connector.execute_query_one_async(query))["n"]:  # noqa: ASYNC110
        await anyio.sleep(0.02)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.procrastinate_app", description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--concurrency", type=int, default=10)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    anyio.run(_work, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
