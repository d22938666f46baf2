"""Worker processes under test: started as subprocesses (so they never share a GIL with
the measuring process), watched for resident memory, stopped with SIGTERM.

They are started the way systemd starts a ``Type=notify`` service: each gets a
``NOTIFY_SOCKET`` of its own and is ready once it sends ``READY=1`` there, which
``herder run`` does once it serves."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import anyio
import anyio.abc

ROOT = Path(__file__).resolve().parent.parent
LOG_DIR = ROOT / ".herder" / "bench-logs"


def read_status_kb(pid: int, field_name: str) -> int | None:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM), or None when unavailable."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time the process has used so far."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class Memory:
    peak_rss_kb: int = 0  # the highest VmRSS we saw while polling
    hwm_kb: int = 0  # the kernel's own high-water mark, VmHWM, read last

    @property
    def peak_mb(self) -> float:
        return max(self.peak_rss_kb, self.hwm_kb) / 1024


@dataclass
class Worker:
    """One running worker process."""

    name: str
    process: anyio.abc.Process
    log_path: Path
    log: IO[bytes]
    notify: socket.socket
    memory: Memory = field(default_factory=Memory)
    cpu_start: float = 0.0

    @property
    def pid(self) -> int:
        return self.process.pid

    def notifications(self) -> list[str]:
        """The ``KEY=VALUE`` lines it sent since the last call. Read while it runs, so its
        ``STATUS=`` updates never fill the socket."""
        lines: list[str] = []
        while True:
            try:
                lines += self.notify.recv(4096).decode(errors="replace").splitlines()
            except BlockingIOError:
                return lines

    def sample(self) -> None:
        self.notifications()
        rss = read_status_kb(self.pid, "VmRSS")
        if rss is not None:
            self.memory.peak_rss_kb = max(self.memory.peak_rss_kb, rss)
        hwm = read_status_kb(self.pid, "VmHWM")
        if hwm is not None:
            self.memory.hwm_kb = max(self.memory.hwm_kb, hwm)

    def cpu(self) -> float:
        """CPU seconds since the mark set by ``mark_cpu``."""
        now = cpu_seconds(self.pid)
        return 0.0 if now is None else now - self.cpu_start

    def mark_cpu(self) -> None:
        self.cpu_start = cpu_seconds(self.pid) or 0.0


class WorkerFailed(RuntimeError):
    pass


async def start_worker(
    name: str,
    module: str,
    args: list[str],
    *,
    ready_timeout: float = 60.0,
) -> Worker:
    """Run ``python -m module args...`` and wait until it sends ``READY=1``."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / f"{name}.log"
    log = log_path.open("wb")
    # An abstract socket: no file to clean up, gone with the last descriptor.
    address = f"herder-bench-{name}-{secrets.token_hex(6)}"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    notify.bind("\0" + address)
    notify.setblocking(False)
    process = await anyio.open_process(
        [sys.executable, "-m", module, *args],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        # Settings are the arguments alone: a HERDER_* of the shell is not measured.
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("HERDER_")},
            "NOTIFY_SOCKET": "@" + address,
        },
    )
    worker = Worker(name, process, log_path, log, notify)
    try:
        deadline = time.monotonic() + ready_timeout
        while "READY=1" not in worker.notifications():
            if process.returncode is not None:
                raise WorkerFailed(f"{name} exited with {process.returncode}: {tail(log_path)}")
            if time.monotonic() > deadline:
                raise WorkerFailed(f"{name} not ready after {ready_timeout}s: {tail(log_path)}")
            await anyio.sleep(0.02)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await stop_worker(worker, timeout=5)
        raise
    worker.mark_cpu()
    worker.sample()
    return worker


async def stop_worker(worker: Worker, timeout: float = 30.0) -> int | None:
    """SIGTERM, wait for a clean exit, SIGKILL after ``timeout``; return the exit code."""
    worker.sample()
    process = worker.process
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        with anyio.move_on_after(timeout):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
    await process.aclose()
    worker.log.close()
    worker.notify.close()
    return process.returncode


async def watch_memory(workers: list[Worker], interval: float = 0.1) -> None:
    """Sample every worker's RSS until cancelled."""
    while True:
        for worker in workers:
            worker.sample()
        await anyio.sleep(interval)


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])
