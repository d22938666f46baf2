"""An embedded PostgreSQL (the pgserver package) for ``make run``, demos and tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

DEFAULT_DATA_DIR = Path(".herder") / "pgdata"


def start(data_dir: Path | None = None, *, keep_running: bool = True) -> tuple[str, Any]:
    """Start (or reuse) a server under ``data_dir``; return its URL and handle.

    With ``keep_running`` the server outlives this process, so the psql line printed by
    ``make run`` keeps working and the next start is instant.
    """
    from pgserver.postgres_server import get_server

    path = (data_dir or Path(os.environ.get("HERDER_DATA_DIR", DEFAULT_DATA_DIR))).resolve()
    path.mkdir(parents=True, exist_ok=True)
    server = get_server(path, cleanup_mode=None if keep_running else "stop")
    url: str = server.get_uri()
    return url, server
