"""The results: a rich table for people, ``results.json`` for machines. Targets are the
speed issue's (one daemon, default settings, this machine class)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.model import (
    History,
    Latency,
    Prepare,
    Profile,
    ScaleOut,
    Sharing,
    Soak,
    Throughput,
)


@dataclass
class Results:
    meta: dict[str, Any] = field(default_factory=dict)
    herder_throughput: Throughput | None = None
    herder_latency: Latency | None = None
    herder_rss_mb: dict[str, float] = field(default_factory=dict)
    prepare: Prepare | None = None
    soak: Soak | None = None
    scale_out: ScaleOut | None = None
    history: History | None = None
    sharing: Sharing | None = None
    procrastinate_throughput: Throughput | None = None
    procrastinate_latency: Latency | None = None
    procrastinate_rss_mb: float | None = None
    errors: dict[str, str] = field(default_factory=dict)
    profiles: dict[str, Profile] = field(default_factory=dict)

    # ------------------------------------------------------------ derived

    @property
    def herder_peak_rss_mb(self) -> float | None:
        return max(self.herder_rss_mb.values()) if self.herder_rss_mb else None

    def ratios(self) -> dict[str, float | None]:
        h, p = self.herder_throughput, self.procrastinate_throughput
        hl, pl = self.herder_latency, self.procrastinate_latency
        return {
            "throughput": _div(h.rate, p.rate) if h and p else None,
            "wall_throughput": _div(h.wall_rate, p.wall_rate) if h and p else None,
            "latency_p50": _div(hl.p50_ms, pl.p50_ms) if hl and pl else None,
            "latency_p99": _div(hl.p99_ms, pl.p99_ms) if hl and pl else None,
        }

    def targets(self) -> list[dict[str, Any]]:
        """Each target of the issue this run measured: value, bound and verdict."""
        out: list[dict[str, Any]] = []

        def add(name: str, value: float | None, bound: float, at_least: bool, unit: str) -> None:
            if value is None or math.isnan(value):
                return
            met = value >= bound if at_least else value <= bound
            out.append(
                {
                    "name": name,
                    "value": value,
                    "bound": bound,
                    "at_least": at_least,
                    "unit": unit,
                    "met": met,
                }
            )

        if self.herder_throughput:
            add("no-op throughput", self.herder_throughput.rate, 30_000, True, "tasks/s")
        add("throughput vs procrastinate", self.ratios()["throughput"], 50, True, "x")
        if self.herder_latency:
            add("latency p50", self.herder_latency.p50_ms, 5, False, "ms")
            add("latency p99", self.herder_latency.p99_ms, 25, False, "ms")
        if self.prepare and self.prepare.tasks >= 1_000_000:
            add("1M-task job PENDING after", self.prepare.seconds, 10, False, "s")
        add("daemon peak RSS", self.herder_peak_rss_mb, 200, False, "MB")
        if self.soak and self.soak.tasks >= 3_000_000:
            add("soak last/first million", self.soak.ratio, 1 / 1.2, True, "x")
        if self.scale_out and self.scale_out.daemons >= 3:
            add(f"{self.scale_out.daemons} daemons vs 1", self.scale_out.ratio, 1.5, True, "x")
        if self.history:
            h = self.history
            add("single-task jobs after history vs empty", h.single_ratio, 0.9, True, "x")
            add("many small jobs vs one job", h.spread_settle_ratio, 0.7, True, "x")
            add("show a job", max(h.show_ms_big_job, h.show_ms_single_task_job), 10, False, "ms")
        if self.sharing:
            s = self.sharing
            add("small job behind a big one", s.small_behind_big_s, 2.0, False, "s")
            add(
                "small job behind long preparations", s.small_behind_preparations_s, 2.0, False, "s"
            )
            add("100 ms tasks held at most", s.held_most, 150, False, "tasks")
            add("urgent job behind held work", s.urgent_s, 1.5, False, "s")
            add("20 plain sleep(0.5) tasks", s.plain_sleep_s, 1.5, False, "s")
            add("mixed fleet: jobs failed", s.mixed_fleet_failed, 0, False, "jobs")
            add("no-op throughput, fair sharing on vs off", s.fairness_cost_ratio, 0.9, True, "x")
        return out

    def as_json(self) -> dict[str, Any]:
        """Everything, JSON-ready (NaN, which JSON lacks, becomes null)."""
        return _finite(self._as_dict())  # type: ignore[no-any-return]

    def _as_dict(self) -> dict[str, Any]:
        soak = asdict(self.soak) if self.soak else None
        scale = None
        if self.scale_out:
            scale = asdict(self.scale_out) | {"ratio": self.scale_out.ratio}
        return {
            "meta": self.meta,
            "herder": {
                "throughput": _asdict(self.herder_throughput),
                "latency": _asdict(self.herder_latency),
                "prepare": _asdict(self.prepare),
                "peak_rss_mb": self.herder_peak_rss_mb,
                "peak_rss_mb_by_phase": self.herder_rss_mb,
                "soak": soak,
                "scale_out": scale,
                "history": _history(self.history),
                "sharing": _asdict(self.sharing),
                "profiles": {k: asdict(v) for k, v in self.profiles.items()} or None,
            },
            "procrastinate": {
                "throughput": _asdict(self.procrastinate_throughput),
                "latency": _asdict(self.procrastinate_latency),
                "peak_rss_mb": self.procrastinate_rss_mb,
            },
            "ratios_herder_over_procrastinate": self.ratios(),
            "targets": self.targets(),
            "errors": self.errors,
        }

    # ------------------------------------------------------------ table

    def table(self) -> Table:
        meta = self.meta
        table = Table(
            title=(
                f"herder vs Procrastinate {meta.get('procrastinate_version', '')} · "
                f"PostgreSQL {meta.get('postgres_version', '?')}"
                f"{' (embedded)' if meta.get('embedded') else ''} · "
                f"{meta.get('cores', '?')} cores · concurrency {meta.get('concurrency', '?')}"
            ),
            caption="ratio = herder ÷ procrastinate (throughput: higher is better for herder; "
            "latency: lower is) · machine busy before the run: "
            f"{meta.get('background_cpu_busy', float('nan')):.0%} · {meta.get('date', '')}",
        )
        table.add_column("measure")
        table.add_column("herder", justify="right")
        table.add_column("procrastinate", justify="right")
        table.add_column("ratio", justify="right")
        table.add_column("target")
        verdicts = {t["name"]: t["met"] for t in self.targets()}

        def mark(*names: str) -> str:
            found = [verdicts[n] for n in names if n in verdicts]
            if not found:
                return ""
            return "[green]✓[/green]" if all(found) else "[red]✗[/red]"

        h, p = self.herder_throughput, self.procrastinate_throughput
        ratios = self.ratios()
        table.add_row(
            "no-op throughput\n[dim]first start → last end[/dim]",
            _rate(h),
            _rate(p),
            _x(ratios["throughput"]),
            f"≥ 30,000/s and ≥ 50× {mark('no-op throughput', 'throughput vs procrastinate')}",
        )
        table.add_row(
            "submit → settle\n[dim]wall, DB clock[/dim]",
            _wall(h),
            _wall(p),
            _x(ratios["wall_throughput"]),
            "",
        )
        table.add_row(
            "CPU during the run\n[dim]worker processes; PostgreSQL; machine[/dim]",
            _cpu(h, meta.get("cores")),
            _cpu(p, meta.get("cores")),
            "",
            "",
        )
        hl, pl = self.herder_latency, self.procrastinate_latency
        table.add_row(
            "commit-to-start latency p50" + (_latency_note(hl) if hl else ""),
            _ms(hl.p50_ms if hl else None)
            + (
                f"\n[dim]of which prepare {hl.prepare_p50_ms:.1f} ms[/dim]"
                if hl and hl.prepare_p50_ms is not None
                else ""
            ),
            _ms(pl.p50_ms if pl else None),
            _x(ratios["latency_p50"]),
            f"≤ 5 ms {mark('latency p50')}",
        )
        table.add_row(
            "commit-to-start latency p99",
            _ms(hl.p99_ms if hl else None),
            _ms(pl.p99_ms if pl else None),
            _x(ratios["latency_p99"]),
            f"≤ 25 ms {mark('latency p99')}",
        )
        if self.prepare:
            pr = self.prepare
            table.add_row(
                f"prepare a {pr.tasks:,}-task job\n[dim]INSERT commit → PENDING[/dim]",
                f"{pr.seconds:.2f} s\n[dim]{pr.rate:,.0f} tasks/s[/dim]",
                "—",
                "",
                f"≤ 10 s {mark('1M-task job PENDING after')}",
            )
        rss = self.herder_peak_rss_mb
        table.add_row(
            "worker peak RSS\n[dim]VmHWM of the worker process[/dim]",
            f"{rss:.0f} MB" if rss is not None else "—",
            f"{self.procrastinate_rss_mb:.0f} MB" if self.procrastinate_rss_mb else "—",
            "",
            f"≤ 200 MB {mark('daemon peak RSS')}",
        )
        if self.soak:
            s = self.soak
            table.add_row(
                f"soak: {s.tasks:,} tasks, {s.jobs} jobs\n[dim]first vs last {s.window:,}[/dim]",
                f"{s.first_rate:,.0f} → {s.last_rate:,.0f}/s\n[dim]last/first {s.ratio:.2f}, "
                f"overall {s.rate:,.0f}/s[/dim]",
                "—",
                "",
                f"last ≥ first ÷ 1.2 {mark('soak last/first million')}",
            )
        if self.scale_out:
            so = self.scale_out
            table.add_row(
                f"scale-out: {so.tasks:,} tasks of {so.task_ms:g} ms\n"
                f"[dim]1 daemon vs {so.daemons}[/dim]",
                f"{so.one.rate:,.0f} → {so.many.rate:,.0f}/s\n[dim]{so.ratio:.2f}×[/dim]",
                "—",
                "",
                f"≥ 1.5× {mark(f'{so.daemons} daemons vs 1')}",
            )
        if self.history:
            hist = self.history
            table.add_row(
                f"history: {hist.single_task_jobs} single-task jobs\n"
                f"[dim]empty vs after {hist.finished_tasks:,} finished tasks[/dim]",
                f"{hist.single_rate_empty:,.0f} → {hist.single_rate_after:,.0f}/s\n"
                f"[dim]{hist.single_ratio:.2f}×[/dim]",
                "—",
                "",
                f"≥ 0.9× {mark('single-task jobs after history vs empty')}",
            )
            table.add_row(
                f"history: tasks in {hist.many_jobs:,} jobs of two owners\n"
                "[dim]vs the same tasks in one job, after the history,\n"
                "submit → settle (start → end)[/dim]",
                f"{hist.many_jobs_settle_after:,.0f} vs {hist.one_job_settle_after:,.0f}/s\n"
                f"[dim]{hist.spread_settle_ratio:.2f}× ({hist.spread_ratio:.2f}×); empty: "
                f"{hist.many_jobs_settle_empty:,.0f} vs {hist.one_job_settle_empty:,.0f}[/dim]",
                "—",
                "",
                f"≥ 0.7× {mark('many small jobs vs one job')}",
            )
            table.add_row(
                "history: herder show, median\n[dim]a 100k-task job / a 1-task job[/dim]",
                f"{hist.show_ms_big_job:.1f} / {hist.show_ms_single_task_job:.1f} ms",
                "—",
                "",
                f"≤ 10 ms {mark('show a job')}",
            )
        if self.sharing:
            sh = self.sharing
            for label, value, target, name in [
                (
                    "sharing: a 10-task job behind a 20,000-task job\n[dim]submit → done[/dim]",
                    f"{sh.small_behind_big_s:.2f} s",
                    "≤ 2 s",
                    "small job behind a big one",
                ),
                (
                    "sharing: the same behind three long preparations",
                    f"{sh.small_behind_preparations_s:.2f} s",
                    "≤ 2 s",
                    "small job behind long preparations",
                ),
                (
                    "sharing: 100 ms tasks held at most\n[dim]after 5,000 no-op tasks[/dim]",
                    f"{sh.held_most}",
                    "about 100",
                    "100 ms tasks held at most",
                ),
                (
                    "sharing: a priority-5 job of ten 100 ms tasks\n"
                    "[dim]behind the held ones, submit → done[/dim]",
                    f"{sh.urgent_s:.2f} s",
                    "≤ 1.5 s",
                    "urgent job behind held work",
                ),
                (
                    "sharing: 20 plain time.sleep(0.5) tasks",
                    f"{sh.plain_sleep_s:.2f} s",
                    "≤ 1.5 s",
                    "20 plain sleep(0.5) tasks",
                ),
                (
                    "sharing: two daemons, different --app\n[dim]jobs failed of all[/dim]",
                    f"{sh.mixed_fleet_failed} of {sh.mixed_fleet_jobs}",
                    "none",
                    "mixed fleet: jobs failed",
                ),
                (
                    "sharing: no-op throughput, fair sharing on\n[dim]vs off, back to back[/dim]",
                    f"{sh.fair_rate:,.0f} vs {sh.unfair_rate:,.0f}/s\n"
                    f"[dim]{sh.fairness_cost_ratio:.2f}×[/dim]",
                    "≥ 0.9×",
                    "no-op throughput, fair sharing on vs off",
                ),
            ]:
                table.add_row(label, value, "—", "", f"{target} {mark(name)}")
        return table

    def print(self, console: Console) -> None:
        console.print(self.table())
        for name, message in self.errors.items():
            console.print(f"[red]error in {name}:[/red] {message}")
        for item in (
            self.herder_throughput,
            self.herder_latency,
            self.prepare,
            self.soak,
            self.procrastinate_throughput,
            self.procrastinate_latency,
        ):
            if item is not None and item.problems:
                what = type(item).__name__
                console.print(f"[red]problem ({what}):[/red] {'; '.join(item.problems)}")
        for phase, profile in self.profiles.items():
            self._print_profile(console, phase, profile)

    @staticmethod
    def _print_profile(console: Console, phase: str, profile: Profile) -> None:
        console.print(f"[bold]Profile of herder's {phase} run[/bold]")
        if not profile.leaf_frames:
            console.print("  py-spy: no samples (install it: .venv/bin/pip install py-spy)")
        else:
            console.print("  daemon (py-spy), innermost herder frame per sample:")
            for frame, share in profile.herder_frames:
                console.print(f"    {share:6.1%}  {frame}")
            console.print("  daemon (py-spy), leaf frames:")
            for frame, share in profile.leaf_frames:
                console.print(f"    {share:6.1%}  {frame}")
        console.print(
            f"  database (pg_stat_activity, {profile.db_samples} samples), "
            "mean active backends per statement and wait:"
        )
        for statement, wait, active in profile.db_statements:
            console.print(f"    {active:5.2f}  {wait:<20} {statement[:80]}", markup=False)


def _latency_note(latency: Latency) -> str:
    every = latency.interval_seconds * 1000
    return f"\n[dim]{latency.samples} single-task jobs, one every {every:g} ms[/dim]"


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _history(history: History | None) -> dict[str, Any] | None:
    if history is None:
        return None
    return asdict(history) | {
        "single_ratio": history.single_ratio,
        "spread_ratio": history.spread_ratio,
        "spread_settle_ratio": history.spread_settle_ratio,
    }


def _asdict(value: Any) -> dict[str, Any] | None:
    return asdict(value) if value is not None else None


def _div(a: float, b: float) -> float | None:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else None


def _x(ratio: float | None) -> str:
    if ratio is None:
        return "—"
    return f"{ratio:,.1f}×" if ratio >= 10 else f"{ratio:.2f}×"


def _ms(value: float | None) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.1f} ms"


def _rate(t: Throughput | None) -> str:
    if t is None:
        return "—"
    unit = "tasks/s" if t.system == "herder" else "jobs/s"
    return f"{t.rate:,.0f} {unit}\n[dim]{t.tasks:,} in {t.run_seconds:.2f} s[/dim]"


def _wall(t: Throughput | None) -> str:
    if t is None:
        return "—"
    extra = f", prepare {t.prepare_seconds:.2f} s" if t.prepare_seconds is not None else ""
    return f"{t.wall_rate:,.0f}/s\n[dim]{t.wall_seconds:.2f} s{extra}[/dim]"


def _cpu(t: Throughput | None, cores: Any) -> str:
    if t is None:
        return "—"
    server = f"pg {t.server_cores:.2f}; " if t.server_cores is not None else ""
    return (
        f"{t.worker_cores:.2f} cores\n"
        f"[dim]{server}machine {t.machine_cpu_busy:.0%} of {cores}[/dim]"
    )
