"""Fault injection: each of the daemon's named queries fails in turn, in each of three
ways (tests/faults.py: the connection lost before the query, the reply lost after it
committed, a statement error), while a few jobs run through one in-process daemon.

After each: the daemon is alive and still serves a fresh job, every job settled as the
contract says, nothing is stranded, every settlement ran its on_finished hook once, and
no attempt was spent for nothing (the one exception, a lost reply to a claim, is
allowed where it happens and named in the failure report).
"""

from __future__ import annotations

import ast
import os
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import anyio
import pytest

import herder
import herder.daemon
from herder import db
from herder.kinds import Kind, get_kind
from herder.sql import QUERIES
from herder.states import JOB_FINISHED
from tests.faults import INJECTED, Fault, FaultyPool, Mode, Watch, describe, faulty_daemon
from tests.support import cloned_database, wait_for

LEASE = 1.0
# ----------------------------------------------------------------- which queries


def _daemon_side_queries() -> set[str]:
    """The named queries the daemon can run: those used by the Store methods that the
    modules the daemon is built from call (read from the source of the store package, so
    new queries are picked up). Falls back to every query but the CLI's."""
    store_dir = Path(sys.modules["herder.store"].__file__ or "").parent
    uses: dict[str, set[str]] = {}
    calls: dict[str, set[str]] = {}
    functions: list[ast.FunctionDef | ast.AsyncFunctionDef] = []
    for store_path in sorted(store_dir.glob("*.py")):
        for node in ast.parse(store_path.read_text()).body:
            if isinstance(node, ast.ClassDef):  # Store and the groups of statements it is made of
                functions += [
                    f for f in node.body if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
                ]
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                functions.append(node)
    for fn in functions:
        uses[fn.name] = set()
        calls[fn.name] = set()
        for sub in ast.walk(fn):
            query = _query_named(sub)
            if query is not None:
                uses[fn.name].add(query)
            elif isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name):
                calls[fn.name].add(sub.attr)
            elif isinstance(sub, ast.Name):
                calls[fn.name].add(sub.id)
    changed = True
    while changed:
        changed = False
        for name, called_names in calls.items():
            for callee in called_names & uses.keys():
                if not uses[callee] <= uses[name]:
                    uses[name] |= uses[callee]
                    changed = True
    # The herder modules the daemon is made of, and the Store methods they call.
    seen: set[str] = set()
    todo = ["herder.daemon"]
    called: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen or module not in sys.modules:
            continue
        seen.add(module)
        path = sys.modules[module].__file__
        if path is None or module.split(".")[:2] == ["herder", "store"]:
            continue
        source = ast.parse(Path(path).read_text())
        for sub in ast.walk(source):
            if isinstance(sub, ast.ImportFrom) and (sub.module or "").startswith("herder"):
                todo.append(sub.module or "")
                todo += [f"{sub.module}.{a.name}" for a in sub.names]
            elif isinstance(sub, ast.Attribute) and sub.attr in uses:
                base = sub.value
                base_name = (
                    base.attr
                    if isinstance(base, ast.Attribute)
                    else base.id
                    if isinstance(base, ast.Name)
                    else ""
                )
                if base_name.endswith("store"):
                    called.add(sub.attr)
    names = set().union(*(uses[m] for m in called)) & QUERIES.keys()
    if len(names) < 5:  # the source is laid out differently: be generous
        names = set(QUERIES) - CLI_ONLY
    return names


def _query_named(node: ast.AST) -> str | None:
    """The query a node of the store's source names: Q["name"] or Q.bind("name", ...)."""
    if (
        isinstance(node, ast.Subscript)
        and isinstance(node.value, ast.Name)
        and node.value.id == "Q"
        and isinstance(node.slice, ast.Constant)
        and isinstance(node.slice.value, str)
    ):
        return node.slice.value
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "Q"
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ):
        return node.args[0].value
    return None


#: What only people run (the CLI, psql): the daemon never does.
CLI_ONLY = {
    "submit",
    "cancel_job",
    "resume_job",
    "retry_job",
    "restart_job",
    "verify_job",
    "get_job",
    "list_jobs",
    "job_problems",
}
#: Run by the daemon, but not where this harness can reach them.
NOT_EXERCISED = {
    "prunable_jobs": "retention pruning first runs 10-60 s after the daemon starts",
    "prune_tasks": "retention pruning first runs 10-60 s after the daemon starts",
    "prune_jobs": "retention pruning first runs 10-60 s after the daemon starts",
    "max_result_bytes": "read once as the worker starts, before the harness can wrap the "
    "pool (needs a seam: a pool wrapper in DaemonConfig)",
    "database_clock": "read once as the daemon starts, before the harness can wrap the pool",
    "register_kinds": "run once as the daemon starts, before the harness can wrap the pool",
}
#: Run only when the daemon shuts down: the shutdown scenario.
SHUTDOWN = {"release_preparation", "release_tasks"}
#: Run only for a batch big enough to go by COPY: the scenario adds such a job.
COPY = {"skip_row_triggers", "fire_row_triggers"}
#: Run only while a job is being canceled: the scenario adds a job it cancels.
CANCEL = {"cancel_pending_batch"}
#: Run only after retry_job or restart_job: the scenario retries a failed job and
#: restarts a finished one.
CONTROL = {"reopen_batch", "reopening_jobs", "stale_jobs", "stale_tasks", "discard_stale_batch"}
#: Run only after another query failed: that fault comes first.
AFTER = {"my_running_tasks": ("claim_tasks", Mode.LOST_AFTER)}
#: Calls of these rarely return or change anything, so every call counts (and they are
#: armed only once the jobs are in).
EVERY_CALL = {
    "stale_jobs",  # a restarted job's preparer usually discards its old tasks first
    "rescue_expired_tasks",
    "jobs_not_running",
    "preparations_lost",
    "expire_daemons",  # a daemon that died without forgetting itself is rare
}
#: The daemon's queries this scenario was written against; a query not listed here (new
#: in the code) gets every extra job, so that it has the best chance to run.
KNOWN = {
    "claim_preparations",
    "write_small_preparations",
    "copy_modes",
    "write_batch",
    "write_last_batch",
    "fail_preparation",
    "renew_preparations",
    "preparations_lost",
    "claim_tasks",
    "start_jobs",
    "complete_tasks",
    "complete_successes",
    "renew_task_leases",
    "jobs_not_running",
    "rescue_expired_tasks",
    "settle_candidates",
    "prefer_indexes",
    "lock_for_settlement",
    "task_counts",
    "apply_settlements",
    "claim_finish_hook",
    "renew_finish_hook",
    "fold_counts",
    "fold_counts_lock",
    "finish_hook_done",
    "ping",
    "queue_depth",
    *NOT_EXERCISED,
    *SHUTDOWN,
    *COPY,
    *CANCEL,
    *CONTROL,
    *AFTER,
}

DAEMON_QUERIES = sorted(_daemon_side_queries())
CASES = [
    pytest.param(
        name,
        mode,
        id=f"{name}-{mode.value}",
        marks=[pytest.mark.skip(reason=NOT_EXERCISED[name])] if name in NOT_EXERCISED else [],
    )
    for name in DAEMON_QUERIES
    for mode in Mode
]


# ----------------------------------------------------------------- the scenario


@dataclass
class Expect:
    """What one job must end as, and what each of its tasks needs."""

    job_id: int
    status: str
    #: seq -> attempts it needs (the rest: 1); None: any task may have 0 or 1.
    attempts: dict[int, int] | None = field(default_factory=dict)
    tasks: int = 0
    message_has: str | None = None
    hooked: bool = True
    #: Settlements to SUCCESS/WARNING/FAILURE (each runs on_finished once).
    settlements: int = 1


@dataclass
class Scenario:
    """Kinds whose on_finished hooks count their runs, and a gate that holds its
    preparation and its tasks open until the fault has fired (at most a moment), so
    that leases are renewed and batches flushed while something is held."""

    hooks: Counter[int] = field(default_factory=Counter)
    faulty: FaultyPool | None = None
    #: While set, the hold kind's preparations and tasks wait for it.
    held: anyio.Event | None = None

    def declare(self, make_kind: Callable[..., Kind]) -> None:
        synthetic = get_kind("synthetic")
        assert synthetic is not None
        counted = make_kind(
            "fsynth", max_attempts=3, backoff=0.05, max_backoff=1.0, prepare_resumes=True
        )
        counted.prepare(synthetic.prepare_fn)
        counted.process(synthetic.process_fn)
        counted.on_finished(self._count)

        gate = make_kind("gate", max_attempts=3, backoff=0.05, max_backoff=1.0)

        @gate.prepare
        async def prepare(job: herder.JobContext) -> AsyncIterator[herder.JSON]:
            yield {"i": 0}
            # Long enough for the coordinator to flush a batch (write_batch) and for the
            # heartbeat to renew the preparation's lease.
            await self._hold("renew_preparations", at_least=0.26, at_most=0.6)
            yield {"i": 1}

        @gate.process
        async def process(task: herder.TaskContext) -> herder.JSON:
            # The sweep asks about held tasks' jobs only while some are held.
            await self._hold("renew_task_leases", "jobs_not_running", at_least=0, at_most=0.8)
            return None

        @gate.on_finished
        async def finished(job: herder.FinishedJob) -> None:
            await self._count(job)
            await self._hold("renew_finish_hook", at_least=0, at_most=0.8)

        # The shutdown scenario's kind: its preparation and its tasks wait while ``held``
        # is set (the first daemon is stopped meanwhile), and run through once it is not.
        hold = make_kind("hold", max_attempts=3, backoff=0.05, max_backoff=1.0)

        @hold.prepare
        async def hold_prepare(job: herder.JobContext) -> AsyncIterator[herder.JSON]:
            for i in range(job.payload["tasks"]):
                if i == 1 and job.payload.get("hold") and self.held is not None:
                    if not self.held.is_set():
                        await anyio.sleep(0.26)  # so that the coordinator flushes task 0
                    yield {"i": i}  # ... when it gets this one
                    await self.held.wait()
                else:
                    yield {"i": i}

        @hold.process
        async def hold_process(task: herder.TaskContext) -> herder.JSON:
            if self.held is not None:
                await self.held.wait()
            return None

        hold.on_finished(self._count)

    async def _count(self, job: herder.FinishedJob) -> None:
        self.hooks[job.id] += 1

    async def _hold(self, *renewals: str, at_least: float, at_most: float) -> None:
        """Wait until the fault fired, or (after ``at_least`` seconds) until the daemon
        ran each of ``renewals`` (they run only while something is held, so: while this
        is)."""
        faulty = self.faulty
        if faulty is None:
            return
        before = {name: faulty.injector.completed[name] for name in renewals}
        started = time.monotonic()

        async def released() -> bool:
            if faulty.fired:
                return True
            return time.monotonic() - started >= at_least and all(
                faulty.injector.completed[name] > count for name, count in before.items()
            )

        with anyio.move_on_after(at_most):
            while not await released():
                with anyio.move_on_after(0.02):
                    await faulty.injector.fired_event.wait()


async def submit(conn: db.Connection, kind: str, payload: Any) -> int:
    job_id: int = await conn.fetchval(
        "INSERT INTO herder.jobs (kind, payload) VALUES ($1, $2) RETURNING id", kind, payload
    )
    return job_id


async def probe_health(daemon: herder.daemon.Daemon) -> int:
    url = f"http://127.0.0.1:{daemon.health_port}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as http:
        async with http.get(f"{url}/metrics") as response:
            await response.read()
        async with http.get(f"{url}/healthz") as response:
            await response.read()
            return response.status


async def pending_hooks(conn: db.Connection) -> int:
    """Settlements whose on_finished has not run yet (either outbox layout)."""
    if await conn.fetchval("SELECT to_regclass('herder.finish_hooks') IS NOT NULL"):
        n: int = await conn.fetchval("SELECT count(*) FROM herder.finish_hooks")
    else:
        n = await conn.fetchval("SELECT count(*) FROM herder.jobs WHERE finish_pending")
    return n


async def settled(conn: db.Connection, job_ids: list[int]) -> bool:
    n = await conn.fetchval(
        "SELECT count(*) FROM herder.jobs WHERE id = ANY($1::bigint[]) AND status = ANY($2)",
        job_ids,
        list(JOB_FINISHED),
    )
    return bool(n == len(job_ids))


async def check(
    conn: db.Connection, scenario: Scenario, expected: list[Expect], lost_claims: set[int]
) -> list[str]:
    """Everything wrong with the jobs, as sentences. ``lost_claims``: task ids whose
    claim's reply was lost. Their attempt is not allowed to be spent for nothing either:
    the daemon can ask the database what it runs (my_running_tasks) and hand back what
    it does not hold, unspent, instead of waiting for the lease to run out."""
    problems: list[str] = []
    for want in expected:
        job = await conn.fetchrow("SELECT * FROM herder.jobs WHERE id = $1", want.job_id)
        assert job is not None
        tasks = await conn.fetch(
            "SELECT id, seq, status, attempts, attempts_base, message FROM herder.tasks "
            "WHERE job_id = $1 ORDER BY seq",
            want.job_id,
        )
        label = f"job {want.job_id} ({job['kind']} {job['payload']})"
        refused = INJECTED in (job["message"] or "") or any(
            INJECTED in (t["message"] or "") for t in tasks
        )
        if job["status"] not in JOB_FINISHED:
            problems.append(f"{label} never settled: {job['status']} {job['message']!r}")
            continue
        if job["status"] != want.status and not (job["status"] == "FAILURE" and refused):
            problems.append(
                f"{label} settled {job['status']} ({job['message']!r}), expected {want.status}"
            )
        if job["message"] is None:
            problems.append(f"{label} settled {job['status']} with no message")
        if want.message_has and not refused and want.message_has not in (job["message"] or ""):
            problems.append(f"{label}: message {job['message']!r} lacks {want.message_has!r}")
        stranded = [(t["seq"], t["status"]) for t in tasks if t["status"] not in JOB_FINISHED]
        if stranded:
            problems.append(f"{label} settled with tasks stranded: {stranded[:5]}")
        if want.status != "CANCELED" and not refused and len(tasks) != want.tasks:
            problems.append(f"{label} has {len(tasks)} tasks, expected {want.tasks}")
        for t in tasks:
            if want.attempts is None:
                needed, most = 0, 1
            else:
                needed = most = want.attempts.get(t["seq"], 1)
            if INJECTED in (t["message"] or ""):
                continue
            spent = t["attempts"] - t["attempts_base"]
            if not needed <= spent <= most:
                problems.append(
                    f"{label} task {t['seq']}: {spent} attempts, needs {needed}"
                    + (" (its claim's reply was lost)" if t["id"] in lost_claims else "")
                    + f"; {t['status']} {t['message']!r}"
                )
        if want.hooked and job["status"] in ("SUCCESS", "WARNING", "FAILURE"):
            runs = scenario.hooks[want.job_id]
            if runs != want.settlements:
                problems.append(
                    f"{label}: on_finished ran {runs} times for {want.settlements} settlements"
                )
        kept = dict(await conn.fetchrow(COUNTS, want.job_id) or {})
        recount = {s.lower(): sum(t["status"] == s for t in tasks) for s in TASK_STATUSES}
        if kept != recount:
            problems.append(f"{label}: counts {kept} but a recount gives {recount}")
    return problems


COUNTS = (
    "SELECT pending, in_progress, success, warning, failure, canceled FROM herder.task_counts($1)"
)
TASK_STATUSES = ("PENDING", "IN_PROGRESS", "SUCCESS", "WARNING", "FAILURE", "CANCELED")


async def run_scenario(
    db_url: str,
    make_kind: Callable[..., Kind],
    *faults: Fault,
    copy: bool = False,
    cancel: bool = False,
    control: bool = False,
) -> tuple[Watch, list[str]]:
    """Run the jobs with ``faults`` armed; the last fault is the one under test."""
    fault = faults[-1]
    scenario = Scenario()
    scenario.declare(make_kind)
    problems: list[str] = []
    conn = await db.connect(db_url)
    try:
        async with faulty_daemon(db_url, lease_seconds=LEASE, concurrency=10) as watch:
            scenario.faulty = watch.faulty
            if fault.query not in EVERY_CALL:
                watch.faulty.arm(*faults)
            expected = [
                Expect(
                    await submit(
                        conn, "fsynth", {"tasks": 30, "flaky": [3], "warn": [5], "fail": [7]}
                    ),
                    "FAILURE",
                    {3: 2},
                    tasks=30,
                ),
                Expect(await submit(conn, "fsynth", {"tasks": 10}), "SUCCESS", tasks=10),
                Expect(await submit(conn, "gate", {}), "SUCCESS", tasks=2),
                Expect(
                    await submit(conn, "fsynth", {"tasks": 1, "bogus": True}),
                    "FAILURE",
                    tasks=0,
                    message_has="bogus",
                ),
            ]
            if copy:
                # Over one batch (10,000), so the job is loaded batch by batch by COPY
                # rather than committed whole with other small jobs.
                expected.append(
                    Expect(await submit(conn, "fsynth", {"tasks": 11000}), "SUCCESS", tasks=11000)
                )
            if cancel:
                # More tasks than a daemon prefetches, so that some are still pending.
                doomed = await submit(conn, "fsynth", {"tasks": 3000, "task_ms": 20})
                expected.append(Expect(doomed, "CANCELED", None, hooked=False))

                async def running() -> bool:
                    if not watch.alive:
                        return True
                    n = await conn.fetchval(
                        "SELECT count(*) FROM herder.tasks WHERE job_id = $1 "
                        "AND status = 'SUCCESS'",
                        doomed,
                    )
                    return bool(n)

                try:
                    await wait_for(running, timeout=10, what="the job to cancel to run")
                except AssertionError as exc:
                    problems.append(str(exc))
                if not await conn.fetchval("SELECT herder.cancel_job($1)", doomed):
                    problems.append(f"cancel_job({doomed}) did not apply")
            if control:
                retried = await submit(conn, "fsynth", {"tasks": 3, "fail": [1]})
                restarted = await submit(conn, "fsynth", {"tasks": 4})
                expected += [
                    Expect(retried, "FAILURE", tasks=3, settlements=2),
                    Expect(restarted, "SUCCESS", tasks=4, settlements=2),
                ]

                async def first_run_settled() -> bool:
                    return not watch.alive or await settled(conn, [retried, restarted])

                try:
                    await wait_for(first_run_settled, timeout=10, what="jobs to retry, restart")
                except AssertionError as exc:
                    problems.append(str(exc))
                if watch.alive:
                    for action, job_id in (("retry", retried), ("restart", restarted)):
                        if not await conn.fetchval(f"SELECT herder.{action}_job($1)", job_id):
                            problems.append(f"{action}_job({job_id}) did not apply")
            if fault.query in EVERY_CALL:
                watch.faulty.arm(*faults)
            if watch.alive:
                try:
                    await probe_health(watch.daemon)  # ping and queue_depth run
                except (aiohttp.ClientError, TimeoutError) as exc:
                    problems.append(f"/healthz did not answer: {exc!r}")
            ids = [e.job_id for e in expected]

            async def all_settled() -> bool:
                return not watch.alive or await settled(conn, ids)

            try:
                await wait_for(all_settled, timeout=3 * LEASE + 10, what="the jobs to settle")
            except AssertionError as exc:
                problems.append(str(exc))

            async def hooks_drained() -> bool:
                return not watch.alive or await pending_hooks(conn) == 0

            try:
                await wait_for(hooks_drained, timeout=2 * LEASE + 10, what="on_finished hooks")
            except AssertionError as exc:
                problems.append(str(exc))
            lost_claims = {
                row["id"]
                for fired in watch.faulty.fired
                if fired.mode is Mode.LOST_AFTER and fired.query == "claim_tasks"
                for row in fired.result
            }
            problems += await check(conn, scenario, expected, lost_claims)
            if watch.alive:
                # Alive means it still serves: a fresh job runs through, and /healthz is ok.
                fresh = await submit(conn, "fsynth", {"tasks": 3})

                async def fresh_done() -> bool:
                    return not watch.alive or (
                        await settled(conn, [fresh]) and await pending_hooks(conn) == 0
                    )

                try:
                    await wait_for(fresh_done, timeout=2 * LEASE + 10, what="a fresh job")
                    problems += await check(
                        conn, scenario, [Expect(fresh, "SUCCESS", tasks=3)], set()
                    )
                except AssertionError as exc:
                    problems.append(f"the daemon no longer serves: {exc}")

                async def healthy() -> bool:
                    return not watch.alive or await probe_health(watch.daemon) == 200

                try:
                    await wait_for(healthy, timeout=3, interval=0.2, what="/healthz to be 200")
                except AssertionError as exc:
                    problems.append(str(exc))
    finally:
        await conn.close()
    if watch.died is not None:
        problems.insert(0, f"the daemon died: {describe(watch.died)}")
    return watch, problems


def report(fault: Fault, watch: Watch, problems: list[str]) -> str:
    fired = ", ".join(str(f) for f in watch.faulty.fired) or "never"
    return (
        f"{fault.query} x {fault.mode.value}: fault fired: {fired}\n  "
        + "\n  ".join(problems)
        + f"\n  (calls by query: {dict(sorted(watch.faulty.calls.items()))})"
    )


@pytest.fixture(scope="module")
async def shared_db_url(server_url: str, template_url: str) -> AsyncIterator[str]:
    """One database for the whole parametrized run (a database per case costs more than
    most cases); each case starts by emptying it."""
    template = urlsplit(template_url).path.lstrip("/")
    async with cloned_database(server_url, f"herder_faults_{os.getpid()}", template) as url:
        yield url


@pytest.fixture
async def fresh_db_url(shared_db_url: str) -> str:
    conn = await db.connect(shared_db_url)
    try:
        await conn.execute("TRUNCATE herder.jobs CASCADE")
    finally:
        await conn.close()
    return shared_db_url


@pytest.mark.parametrize(("query", "mode"), CASES)
async def test_the_daemon_survives_a_failing_query(
    fresh_db_url: str, make_kind: Callable[..., Kind], query: str, mode: Mode
) -> None:
    db_url = fresh_db_url
    fault = Fault(query, mode, effective_only=query not in EVERY_CALL)
    if query in SHUTDOWN:
        watch, problems = await run_shutdown_scenario(db_url, make_kind, fault)
    else:
        unknown = query not in KNOWN
        first = [Fault(*AFTER[query])] if query in AFTER else []
        watch, problems = await run_scenario(
            db_url,
            make_kind,
            *first,
            fault,
            copy=query in COPY or unknown,
            cancel=query in CANCEL or unknown,
            control=query in CONTROL or unknown,
        )
    if not any(f.query == query for f in watch.faulty.fired):
        problems.insert(
            0,
            "the fault never fired: the scenario does not reach this query (extend it, or "
            "list the query in NOT_EXERCISED)",
        )
    assert not problems, report(fault, watch, problems)


# ----------------------------------------------------------------- shutdown


async def run_shutdown_scenario(
    db_url: str, make_kind: Callable[..., Kind], fault: Fault
) -> tuple[Watch, list[str]]:
    """A daemon stopped while it prepares one job and runs another hands both back
    (release_preparation, release_tasks) without spending an attempt; a second daemon
    finishes them."""
    held = anyio.Event()
    scenario = Scenario(held=held)
    scenario.declare(make_kind)
    problems: list[str] = []
    conn = await db.connect(db_url)
    try:
        async with faulty_daemon(db_url, lease_seconds=LEASE, shutdown_timeout=0.05) as first:
            scenario.faulty = first.faulty
            preparing = await submit(conn, "hold", {"tasks": 10, "hold": True})
            running = await submit(conn, "hold", {"tasks": 4})

            async def both_held() -> bool:
                row = await conn.fetchrow(
                    "SELECT (SELECT prepared > 0 AND status = 'PREPARING' FROM herder.jobs "
                    "        WHERE id = $1) AS p, "
                    "       (SELECT count(*) FROM herder.tasks WHERE job_id = $2 "
                    "        AND status = 'IN_PROGRESS') AS r",
                    preparing,
                    running,
                )
                return bool(row is not None and row["p"] and row["r"] == 4)

            try:
                await wait_for(both_held, timeout=5, what="a preparation and tasks held")
            except AssertionError as exc:
                problems.append(str(exc))
            first.faulty.arm(fault)
        if first.died is not None:
            problems.append(f"the daemon crashed while shutting down: {describe(first.died)}")
        held.set()
        async with faulty_daemon(db_url, lease_seconds=LEASE) as second:
            ids = [preparing, running]

            async def done() -> bool:
                return not second.alive or (
                    await settled(conn, ids) and await pending_hooks(conn) == 0
                )

            try:
                await wait_for(done, timeout=3 * LEASE + 10, what="the jobs to settle")
            except AssertionError as exc:
                problems.append(str(exc))
            problems += await check(
                conn,
                scenario,
                [Expect(preparing, "SUCCESS", tasks=10), Expect(running, "SUCCESS", tasks=4)],
                set(),
            )
        if second.died is not None:
            problems.insert(0, f"the second daemon died: {describe(second.died)}")
    finally:
        await conn.close()
    return first, problems


# ----------------------------------------------------------------- the harness itself


async def test_a_lost_connection_on_claim_tasks_is_seen_to_fire(
    db_url: str, make_kind: Callable[..., Kind]
) -> None:
    fault = Fault("claim_tasks", Mode.LOST_BEFORE)
    watch, problems = await run_scenario(db_url, make_kind, fault)
    assert [(f.query, f.mode) for f in watch.faulty.fired] == [("claim_tasks", Mode.LOST_BEFORE)]
    assert watch.faulty.calls["claim_tasks"] >= 2  # the daemon claimed again afterwards
    assert watch.faulty.fired[0].result, "the dry run saw tasks to claim"
    assert not problems, report(fault, watch, problems)


PROBE = {
    "probe_insert": "INSERT INTO faults_probe (v) VALUES ($1) RETURNING v",
    "probe_update": "UPDATE faults_probe SET v = v + 1 WHERE v = $1",
    "probe_read": "SELECT v FROM faults_probe WHERE v = $1",
}


@pytest.fixture
async def probe_pool(db_url: str) -> AsyncIterator[tuple[FaultyPool, db.Pool]]:
    pool = await db.create_pool(db_url, min_size=1, max_size=3)
    try:
        await pool.execute("CREATE TABLE faults_probe (v int)")
        yield FaultyPool(pool, names={sql: name for name, sql in PROBE.items()}), pool
    finally:
        await pool.close()


async def test_harness_modes_on_single_statements(
    probe_pool: tuple[FaultyPool, db.Pool],
) -> None:
    import asyncpg

    faulty, real = probe_pool
    count = "SELECT count(*) FROM faults_probe"
    # (a): nothing is sent; the next call goes through.
    faulty.arm(Fault("probe_insert", Mode.LOST_BEFORE))
    with pytest.raises(asyncpg.exceptions.ConnectionDoesNotExistError, match=INJECTED):
        await faulty.fetchval(PROBE["probe_insert"], 1)
    assert await real.fetchval(count) == 0
    assert await faulty.fetchval(PROBE["probe_insert"], 1) == 1
    # (b): it ran and committed; the caller sees the connection lost.
    faulty.arm(Fault("probe_insert", Mode.LOST_AFTER))
    with pytest.raises(asyncpg.exceptions.ConnectionDoesNotExistError, match="reply lost"):
        await faulty.fetchval(PROBE["probe_insert"], 2)
    assert await real.fetchval(count) == 2
    assert faulty.fired[-1].result == 2
    # (c): refused, nothing changed.
    faulty.arm(Fault("probe_insert", Mode.REFUSED))
    with pytest.raises(asyncpg.exceptions.DataError, match=INJECTED):
        await faulty.fetchval(PROBE["probe_insert"], 3)
    assert await real.fetchval(count) == 2
    # Effective calls only: an UPDATE of no row does not count, the dry run of the one
    # that counts is rolled back, and the second effective call is the one that fails.
    faulty.arm(Fault("probe_update", Mode.LOST_BEFORE, nth=2))
    assert await faulty.execute(PROBE["probe_update"], 99) == "UPDATE 0"
    assert await faulty.execute(PROBE["probe_update"], 1) == "UPDATE 1"  # counted: 1st
    with pytest.raises(asyncpg.exceptions.ConnectionDoesNotExistError):
        await faulty.execute(PROBE["probe_update"], 2)  # the 2nd: fails, nothing changes
    assert sorted(r["v"] for r in await real.fetch("SELECT v FROM faults_probe")) == [2, 2]
    assert [f.call for f in faulty.fired] == [1, 3, 4, 3]
    assert faulty.calls["probe_update"] == 3
    # Unknown SQL passes through untouched.
    assert await faulty.fetchval("SELECT 41 + 1") == 42


async def test_harness_covers_transactions(probe_pool: tuple[FaultyPool, db.Pool]) -> None:
    import asyncpg

    faulty, real = probe_pool
    count = "SELECT count(*) FROM faults_probe"
    # (b) inside a transaction: the error comes after COMMIT, and everything committed.
    faulty.arm(Fault("probe_insert", Mode.LOST_AFTER))
    with pytest.raises(asyncpg.exceptions.ConnectionDoesNotExistError, match="reply lost"):
        async with faulty.acquire() as conn, conn.transaction():
            await conn.fetchval(PROBE["probe_insert"], 1)
            await conn.fetchval(PROBE["probe_insert"], 2)
    assert await real.fetchval(count) == 2
    assert faulty.fired[-1].in_transaction
    # (a) in the middle of a transaction: it rolls back as a whole.
    faulty.arm(Fault("probe_read", Mode.LOST_BEFORE))
    with pytest.raises(asyncpg.exceptions.ConnectionDoesNotExistError):
        async with faulty.acquire() as conn, conn.transaction():
            await conn.fetchval(PROBE["probe_insert"], 3)
            await conn.fetchval(PROBE["probe_read"], 3)  # the dry run (a savepoint) sees 3
    assert await real.fetchval(count) == 2
    # (c) likewise; and a connection outside a transaction.
    faulty.arm(Fault("probe_update", Mode.REFUSED))
    async with faulty.acquire() as conn:
        with pytest.raises(asyncpg.exceptions.DataError):
            await conn.execute(PROBE["probe_update"], 1)
        assert await conn.execute(PROBE["probe_update"], 1) == "UPDATE 1"
    assert sorted(r["v"] for r in await real.fetch("SELECT v FROM faults_probe")) == [2, 2]


def test_the_daemons_queries_are_enumerated() -> None:
    """The source reading finds the daemon's queries and none of the CLI's."""
    assert {"claim_tasks", "complete_tasks", "claim_preparations"} <= set(DAEMON_QUERIES)
    assert not set(DAEMON_QUERIES) & CLI_ONLY
