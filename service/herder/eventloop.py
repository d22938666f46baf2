"""Which event loop herder runs on."""

from __future__ import annotations

from typing import Any


def event_loop_options() -> dict[str, Any]:
    """anyio backend options: uvloop where it is installed (a dependency on Linux and
    macOS), for more throughput and less latency than asyncio's own loop (the README's
    performance section has the figures)."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}
