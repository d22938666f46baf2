"""``HOST:PORT`` as the daemon's listening addresses take it: one parser, shared by the
command line (which checks a flag before anything starts) and the server that binds it.
Kept apart from ``herder.health`` so the command line need not import aiohttp."""

from __future__ import annotations


def parse_addr(addr: str) -> tuple[str | None, int]:
    """``HOST:PORT``, ``[IPv6]:PORT`` or ``:PORT`` (every interface); port 0 = any free."""
    host, sep, port = addr.rpartition(":")
    if not (sep and port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT, got {addr!r}")
    host = host.removeprefix("[").removesuffix("]")
    return host or None, int(port)
