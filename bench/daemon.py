"""One herder daemon alone in its process, so its RSS and CPU are its own:
``python -m bench.daemon URL --concurrency N --ready-file F``.

Writes F once the daemon serves; SIGTERM or SIGINT stops it gracefully (exit 0).
"""

from __future__ import annotations

import argparse
import os
from functools import partial

import anyio

from herder import logs
from herder.daemon import Daemon, DaemonConfig
from herder.eventloop import event_loop_options


async def _serve(args: argparse.Namespace) -> None:
    daemon = Daemon(
        DaemonConfig(
            database_url=args.url,
            concurrency=args.concurrency,
            health_addr=args.health_addr,
            name=args.name,
            prefetch=args.prefetch,
        )
    )
    async with anyio.create_task_group() as tg:
        await tg.start(partial(daemon.run, handle_signals=True))
        if args.ready_file:
            await anyio.Path(args.ready_file).write_text(str(os.getpid()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.daemon", description=__doc__)
    parser.add_argument("url", help="libpq URL of a migrated herder database")
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--health-addr", default="127.0.0.1:0")
    parser.add_argument("--name", default=None)
    parser.add_argument("--prefetch", type=int, default=None, help="default: the daemon's")
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--ready-file", default=None)
    parser.add_argument("--no-uvloop", action="store_true", help="plain asyncio event loop")
    args = parser.parse_args(argv)
    logs.configure(args.log_level, json=True)
    options = {} if args.no_uvloop else event_loop_options()
    anyio.run(_serve, args, backend_options=options)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
