"""What the command line prints: job tables, one job's view, the live progress bar, JSON.

Results go to stdout; the progress bar goes to stderr, so ``herder submit --wait >
out`` keeps a clean result. Nothing here reads the database: the commands pass rows in.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from herder.db import Undecodable
from herder.states import JOB_FINISHED, JobStatus

Job = dict[str, Any]

STATUS_STYLES = {
    "SUCCESS": "green",
    "WARNING": "yellow",
    "FAILURE": "red",
    "CANCELED": "magenta",
    "CANCELING": "magenta",
}
#: Task counts as the bar and the tables show them, in this order.
COUNT_COLUMNS = (
    ("pending", "pending", "default"),
    ("in_progress", "in progress", "cyan"),
    ("success", "success", "green"),
    ("warning", "warning", "yellow"),
    ("failure", "failure", "red"),
    ("canceled", "canceled", "magenta"),
)


def settled(job: Job) -> bool:
    return JobStatus(job["status"]) in JOB_FINISHED


@contextmanager
def progress_bar(job_id: int) -> Iterator[Callable[[Job], None]]:
    """A live progress bar on stderr while the block runs; the block calls the function
    it gets with each fresh read of the job."""
    progress = Progress(
        TextColumn("job {task.fields[job_id]} {task.fields[status]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[counts]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True, highlight=False),
    )
    with progress:
        task = progress.add_task("", total=None, job_id=job_id, status="", counts="")

        def draw(job: Job) -> None:
            # An unknown total (still preparing, no tasks yet) draws a pulsing bar.
            total = job["total"] or (0 if settled(job) else None)
            progress.update(
                task,
                total=total,
                completed=_finished_tasks(job),
                status=_styled_status(job["status"]),
                counts=_counts_markup(job),
            )

        yield draw


def _finished_tasks(job: Job) -> int:
    return int(job["total"] - job["pending"] - job["in_progress"])


def _styled_status(status: str) -> str:
    return f"[{STATUS_STYLES.get(status, 'cyan')}]{status}[/]"


def _counts_markup(job: Job) -> str:
    return "  ".join(
        f"[{style}]{label} {job[key]}[/]" for key, label, style in COUNT_COLUMNS if job[key]
    )


def stdout() -> Console:
    """Rich on stdout. Into a pipe or a file, lines are never wrapped: grep, diff and logs
    get one row per job and whole messages."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = 1000
    return console


def print_json(value: Any) -> None:
    print(json.dumps(value, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Undecodable):  # a payload Python cannot hold: say so
        return str(value)
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def emit(as_json: bool, data: Any, text: str) -> None:
    if as_json:
        print_json(data)
    else:
        print(text)


def _when(moment: datetime | None, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    return "" if moment is None else moment.astimezone().strftime(fmt)


def fleet_table(daemons: list[dict[str, Any]]) -> Table:
    table = Table(box=box.SIMPLE_HEAD)
    for name in ("name", "host", "pid", "started", "seen"):
        table.add_column(name, justify="right" if name == "pid" else "left", no_wrap=True)
    table.add_column("kinds")
    for daemon in daemons:
        table.add_row(
            Text(daemon["name"]),
            Text(daemon["host"]),
            str(daemon["pid"]),
            _when(daemon["started_at"]),
            _when(daemon["seen_at"]),
            Text(", ".join(daemon["kinds"])),
        )
    return table


def jobs_table(jobs: list[Job]) -> Table:
    table = Table(box=box.SIMPLE_HEAD)
    for name in ("id", "kind", "status", "priority", "owner", "created"):
        table.add_column(
            name, justify="right" if name in ("id", "priority") else "left", no_wrap=True
        )
    table.add_column("message")
    for job in jobs:
        table.add_row(
            str(job["id"]),
            Text(job["kind"]),
            Text(job["status"], style=STATUS_STYLES.get(job["status"], "cyan")),
            str(job["priority"]),
            Text(job["owner"]),
            _when(job["created_at"], "%Y-%m-%d %H:%M"),
            # One row per job: the message gives way on a narrow terminal (show has it
            # whole); on the column, no_wrap would squeeze every other column instead.
            Text(job["message"] or "", no_wrap=True, overflow="ellipsis"),
        )
    return table


def _progress_line(job: Job) -> str:
    total, done = job["total"], _finished_tasks(job)
    line = f"{done}/{total} tasks finished"
    if total:
        line += f" ({100 * done // total}%)"
    if job["ended_at"] is not None:
        took = (job["ended_at"] - (job["started_at"] or job["created_at"])).total_seconds()
        line += f" in {took:.1f}s"
    return line


def _counts_table(job: Job) -> Table:
    table = Table(box=box.SIMPLE_HEAD)
    for _key, label, style in COUNT_COLUMNS:
        table.add_column(label, justify="right", header_style=style)
    table.add_column("total", justify="right")
    table.add_row(*(str(job[key]) for key, _label, _style in COUNT_COLUMNS), str(job["total"]))
    return table


def print_job(job: Job, problems: list[Job], *, as_json: bool, brief: bool) -> None:
    """A job as show prints it; ``brief`` (an outcome after waiting) leaves out the
    fields the user just typed."""
    if as_json:
        print_json({**job, "problems": problems})
        return
    out = stdout()
    out.print(
        Text.assemble(
            (f"job {job['id']}", "bold"),
            "  ",
            job["kind"],
            "  ",
            (job["status"], f"bold {STATUS_STYLES.get(job['status'], 'cyan')}"),
        )
    )
    fields = Table.grid(padding=(0, 2))
    fields.add_column(style="dim")
    fields.add_column()
    if job["message"]:
        fields.add_row("message", Text(job["message"]))
    if not brief:
        fields.add_row("payload", Text(json.dumps(job["payload"], default=_json_default)))
        fields.add_row("priority", str(job["priority"]))
        fields.add_row("owner", Text(job["owner"]))
        for name in ("created", "started", "ended"):
            if job[f"{name}_at"] is not None:
                fields.add_row(name, _when(job[f"{name}_at"]))
    fields.add_row("progress", _progress_line(job))
    out.print(fields)
    out.print(_counts_table(job))
    if problems:
        out.print("latest failures and warnings:")
    for task in problems:
        # soft_wrap: a long message stays one line, whole, for grep and copy.
        out.print(
            Text.assemble(
                f"  task {task['seq']}  ",
                (task["status"], STATUS_STYLES.get(task["status"], "")),
                f"  attempt {task['attempts']}: ",
                task["message"] or "",
            ),
            soft_wrap=True,
        )
