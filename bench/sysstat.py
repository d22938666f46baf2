"""Whole-machine CPU use, from /proc/stat (Linux; zeros elsewhere)."""

from __future__ import annotations

import os
import time


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies summed over all cores since boot."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return float(total - idle), float(total)


class CpuMeter:
    """CPU use between ``start`` and ``stop``: the share of all cores busy, and, when the
    PostgreSQL postmaster is local and known, the cores its processes used."""

    def __init__(self, postmaster: int | None = None) -> None:
        self.postmaster = postmaster
        self.busy = 0.0
        self.server_cores: float | None = None
        self.bench_cores = 0.0  # this measuring process
        self.start()

    def start(self) -> None:
        self._start = cpu_times()
        self._wall = time.monotonic()
        self._server = server_cpu_seconds(self.postmaster) if self.postmaster else 0.0
        self._own = time.process_time()

    def stop(self) -> float:
        busy, total = cpu_times()
        spent = total - self._start[1]
        self.busy = (busy - self._start[0]) / spent if spent > 0 else 0.0
        wall = time.monotonic() - self._wall
        self.bench_cores = (time.process_time() - self._own) / wall if wall > 0 else 0.0
        if self.postmaster:
            self.server_cores = (server_cpu_seconds(self.postmaster) - self._server) / wall
        return self.busy


def cores() -> int:
    return os.cpu_count() or 1


def _stat_fields(pid: int | str) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def server_cpu_seconds(postmaster: int) -> float:
    """CPU seconds used so far by a PostgreSQL server: the postmaster, its live children
    (backends, walwriter, autovacuum...), and the children it has reaped."""
    ticks = os.sysconf("SC_CLK_TCK")
    own = _stat_fields(postmaster)
    if own is None:
        return 0.0
    # utime, stime, cutime, cstime are fields 14-17 (1-based); 12-15 after the name.
    total = sum(int(x) for x in own[11:15])
    parent = str(postmaster)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(entry)
        if fields is not None and fields[1] == parent:
            total += int(fields[11]) + int(fields[12])
    return total / ticks


def postmaster_pid(data_dir: str) -> int | None:
    try:
        with open(os.path.join(data_dir, "postmaster.pid")) as pidfile:
            return int(pidfile.readline())
    except (OSError, ValueError):
        return None
